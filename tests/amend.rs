//! `quring amend` against `qemu-img amend` (issue 16, item 6): the same steps on copies of one
//! image (compat 0.10 <-> 1.1 with zero clusters, snapshots and backing files, every refcount
//! width, lazy refcounts), then `qemu-img check` clean, `qemu-img compare` equal and the
//! same format fields in `qemu-img info`; qemu-img's refusals with its messages and exit
//! code, the file left byte for byte; quring's identity extension kept (issue 19).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// The fields of `qemu-img info --output=json` that amend changes or must keep.
fn fields(p: &Path) -> Value {
    let v = qemu_img(["info", "--output=json", &s(p)]).ok().json();
    let d = &v["format-specific"]["data"];
    serde_json::json!({
        "virtual-size": v["virtual-size"],
        "backing-filename": v["backing-filename"],
        "backing-filename-format": v["backing-filename-format"],
        "compat": d["compat"],
        "lazy-refcounts": d["lazy-refcounts"],
        "refcount-bits": d["refcount-bits"],
        "extended-l2": d["extended-l2"],
        "compression-type": d["compression-type"],
    })
}

#[track_caller]
fn check_clean(p: &Path) {
    let c = qemu_img(["check", &s(p)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

#[track_caller]
fn same_content(a: &Path, b: &Path) {
    let c = qemu_img(["compare", &s(a), &s(b)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

/// Runs `amend -o OPTS` with both tools (qemu-img on `q`, quring on `u`): both succeed,
/// and the images agree.
#[track_caller]
fn amend_both(q: &Path, u: &Path, opts: &str) {
    let rq = qemu_img(["amend", "-o", opts, &s(q)]);
    assert_eq!(rq.status(), 0, "qemu-img amend -o {opts}: {}", rq.describe());
    let ru = quring(["amend", "-o", opts, &s(u)]);
    assert_eq!(ru.status(), 0, "quring amend -o {opts}: {}", ru.describe());
    check_clean(u);
    same_content(q, u);
    assert_eq!(fields(q), fields(u), "after amend -o {opts}");
}

/// Runs `amend -o OPTS` with both tools where qemu-img refuses: the same message and exit
/// code, and the images still agree (qemu-img may have done the steps before the refusal).
#[track_caller]
fn refused_both(q: &Path, u: &Path, opts: &str) {
    let rq = qemu_img(["amend", "-o", opts, &s(q)]);
    assert_eq!(rq.status(), 1, "qemu-img amend -o {opts}: {}", rq.describe());
    let ru = quring(["amend", "-o", opts, &s(u)]);
    assert_eq!(ru.status(), 1, "quring amend -o {opts}: {}", ru.describe());
    assert_eq!(ru.stderr, rq.stderr.replace("qemu-img", "quring"), "amend -o {opts}");
    check_clean(u);
    same_content(q, u);
    assert_eq!(fields(q), fields(u), "after amend -o {opts}");
}

fn data_cmds(size: u64) -> Vec<String> {
    vec![
        "write -P 0x11 0 96k".into(),
        format!("write -P 0x22 {} 128k", size / 2),
        "write -z 256k 128k".into(),
        format!("write -z {} 64k", size - 64 * 1024),
        "discard 32k 32k".into(),
    ]
}

/// A refcount width change by quring alone (QEMU 10 takes seconds per change at 64 KiB
/// clusters and does not finish at 1 MiB and more): clean, same content, the new width.
#[track_caller]
fn refcount_width_alone(q: &Path, u: &Path, w: u32) {
    quring(["amend", "-o", &format!("refcount_bits={w}"), &s(u)]).ok();
    check_clean(u);
    same_content(q, u);
    assert_eq!(fields(u)["refcount-bits"], w, "after refcount_bits={w}");
}

#[test]
fn compat_refcounts_and_lazy_match_qemu_img() {
    let dir = tempdir();
    // Cluster size, version, snapshot, refcount widths set by quring alone, then by both
    // tools (both end equal), the width of the late upgrade step.
    type Case = (u32, Compat, bool, &'static [u32], &'static [u32], u32);
    let cases: &[Case] = &[
        (512, Compat::V11, false, &[], &[1, 64, 4, 32], 8),
        (512, Compat::V010, false, &[], &[2, 64], 8),
        (65536, Compat::V11, false, &[1, 4, 32], &[64], 64),
        (65536, Compat::V010, false, &[8, 16], &[], 16),
        (65536, Compat::V11, true, &[2, 8], &[64], 16),
        (2 << 20, Compat::V11, false, &[1, 64, 16], &[], 16),
    ];
    for &(cs, compat, snapshot, alone, both, late) in cases {
        let size = 4 * MIB;
        let q = dir.path().join("q.qcow2");
        let u = dir.path().join("u.qcow2");
        let opts = Qcow2Opts { cluster_size: cs, compat, ..Default::default() };
        build_qcow2(&q, &opts, size, &data_cmds(size));
        if snapshot {
            qemu_img(["snapshot", "-c", "s1", &s(&q)]).ok();
            qemu_io_cmds(&q, "qcow2", &["write -z 0 64k".into(), "write -P 0x44 1M 64k".into()]);
        }
        std::fs::copy(&q, &u).unwrap();
        let ctx = format!("{cs} {compat:?} snapshot={snapshot}");
        eprintln!("case {ctx}");
        if compat == Compat::V010 {
            amend_both(&q, &u, "compat=1.1");
        }
        for &w in alone {
            refcount_width_alone(&q, &u, w);
        }
        for w in both {
            amend_both(&q, &u, &format!("refcount_bits={w}"));
        }
        amend_both(&q, &u, "lazy_refcounts=on");
        qemu_io_cmds(&q, "qcow2", &["write -P 0x55 2M 64k".into()]);
        qemu_io_cmds(&u, "qcow2", &["write -P 0x55 2M 64k".into()]);
        amend_both(&q, &u, "lazy_refcounts=off,refcount_bits=16");
        amend_both(&q, &u, "size=6M");
        let upgrade = format!("compat=1.1,lazy_refcounts=on,refcount_bits={late}");
        if snapshot {
            // The snapshot's disk size (4M) is no longer the image's: QEMU refuses to
            // downgrade, after the refcount change of the last one.
            refused_both(&q, &u, "compat=0.10");
            amend_both(&q, &u, &upgrade);
            refused_both(&q, &u, "refcount_bits=16,compat=0.10");
        } else {
            amend_both(&q, &u, "compat=0.10");
            amend_both(&q, &u, &upgrade);
            amend_both(&q, &u, "refcount_bits=16,compat=0.10");
        }
    }
}

#[test]
fn downgrade_expands_zero_clusters_over_a_backing_file() {
    let dir = tempdir();
    for cs in [512u32, 65536, 2 << 20] {
        let size = 4 * MIB;
        let base = dir.path().join("base.qcow2");
        build_qcow2(&base, &Qcow2Opts::cluster(cs), size, &["write -P 0x77 0 4M".into()]);
        let q = dir.path().join("q.qcow2");
        let u = dir.path().join("u.qcow2");
        let opts =
            Qcow2Opts { cluster_size: cs, backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
        // Zero clusters without host cluster (over the backing data), preallocated zeros
        // (a zero write on allocated clusters), data; and a snapshot sharing some of it.
        build_qcow2(
            &q,
            &opts,
            size,
            &["write -P 0x11 0 1M".into(), "write -z 512k 256k".into(), "write -z 2M 512k".into()],
        );
        qemu_img(["snapshot", "-c", "s1", &s(&q)]).ok();
        qemu_io_cmds(&q, "qcow2", &["write -z 3M 64k".into(), "write -z 0 64k".into()]);
        std::fs::copy(&q, &u).unwrap();
        let snap_raw = |p: &Path, n: &str| {
            let out = dir.path().join(n);
            qemu_img(["convert", "-O", "raw", "-l", "snapshot.name=s1", &s(p), &s(&out)]).ok();
            out
        };
        let before = snap_raw(&u, "before.raw");
        amend_both(&q, &u, "compat=0.10");
        // The snapshot's view is what it was. Not compared with qemu-img's: QEMU 10 writes
        // zeros into the host cluster of a zero cluster that the snapshot shares (0-64k
        // here) and sets COPIED on it, so its own `qemu-img check` then reports
        // "ERROR OFLAG_COPIED data cluster ... refcount=2" and the snapshot reads zeros.
        assert!(raw_bytes_equal(&before, &snap_raw(&u, "su.raw")), "{cs}: snapshot content");
        amend_both(&q, &u, "compat=1.1");
    }
}

/// Refusals: qemu-img's message (its prefix replaced), exit 1, and quring's copy unchanged.
#[test]
fn refusals_match_qemu_img() {
    let dir = tempdir();
    let plain = dir.path().join("plain.qcow2");
    build_qcow2(&plain, &Qcow2Opts::default(), 4 * MIB, &["write -P 1 0 128k".into()]);
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, &Qcow2Opts::default(), 4 * MIB);
    let ov = dir.path().join("ov.qcow2");
    create_qcow2(
        &ov,
        &Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() },
        4 * MIB,
    );
    let ext = dir.path().join("ext.qcow2");
    create_qcow2(&ext, &Qcow2Opts { extended_l2: true, ..Default::default() }, 4 * MIB);
    let rc8 = dir.path().join("rc8.qcow2");
    create_qcow2(&rc8, &Qcow2Opts { refcount_bits: 8, ..Default::default() }, 4 * MIB);
    let snap = dir.path().join("snap.qcow2");
    build_qcow2(&snap, &Qcow2Opts::default(), 4 * MIB, &["write -P 1 0 128k".into()]);
    qemu_img(["snapshot", "-c", "s1", &s(&snap)]).ok();
    let v2 = dir.path().join("v2.qcow2");
    create_qcow2(&v2, &Qcow2Opts { compat: Compat::V010, ..Default::default() }, 4 * MIB);
    let raw = dir.path().join("disk.raw");
    build_raw(&raw, MIB, &[]);
    let cases: Vec<(&Path, Vec<&str>)> = vec![
        (&plain, vec!["-o", "cluster_size=4096"]),
        (&plain, vec!["-o", "extended_l2=on"]),
        (&plain, vec!["-o", "encryption=on"]),
        (&plain, vec!["-o", "preallocation=full"]),
        (&plain, vec!["-o", "compression_type=zstd"]),
        (&plain, vec!["-o", "foo=1"]),
        (&plain, vec!["-o", "compat=0.9"]),
        (&plain, vec!["-o", "refcount_bits=3"]),
        (&plain, vec!["-o", "refcount_bits=128"]),
        (&plain, vec!["-o", "compat=0.10,lazy_refcounts=on"]),
        (&plain, vec!["-o", "compat=0.10,refcount_bits=8"]),
        (&plain, vec!["-o", "data_file=x"]),
        (&plain, vec!["-o", "data_file_raw=on"]),
        (&plain, vec!["-o", "encrypt.state=active"]),
        (&plain, vec![]),
        (&v2, vec!["-o", "lazy_refcounts=on"]),
        (&v2, vec!["-o", "refcount_bits=8"]),
        (&rc8, vec!["-o", "compat=0.10"]),
        (&ext, vec!["-o", "compat=0.10"]),
        (&ov, vec!["-o", "backing_file=other.qcow2"]),
        (&ov, vec!["-o", "backing_file=base.qcow2"]),
        (&ov, vec!["-o", "backing_fmt=raw"]),
        (&snap, vec!["-o", "refcount_bits=1"]),
        (&raw, vec!["-o", "compat=1.1"]),
        (&raw, vec!["-f", "raw", "-o", "compat=1.1"]),
    ];
    for (img, args) in cases {
        let before = std::fs::read(img).unwrap();
        let mut v = vec!["amend".to_string()];
        v.extend(args.iter().map(|a| a.to_string()));
        v.push(s(img));
        let rq = qemu_img(&v);
        assert_eq!(std::fs::read(img).unwrap(), before, "qemu-img changed the file: {v:?}");
        let ru = quring(&v);
        assert_eq!(ru.status(), 1, "{v:?}: {}", ru.describe());
        assert_eq!(rq.status(), 1, "{v:?}: {}", rq.describe());
        assert_eq!(ru.stderr, rq.stderr.replace("qemu-img", "quring"), "{v:?}");
        assert_eq!(std::fs::read(img).unwrap(), before, "quring changed the file: {v:?}");
    }
    // Unchanged backing options are a no-op in both.
    for tool in ["qemu-img", "quring"] {
        let v = ["amend", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", &s(&ov)];
        let r = if tool == "quring" { quring(v) } else { qemu_img(v) };
        assert_eq!(r.status(), 0, "{tool}: {}", r.describe());
    }
}

#[test]
fn help_and_progress() {
    let dir = tempdir();
    let p = dir.path().join("a.qcow2");
    create_qcow2(&p, &Qcow2Opts::default(), 4 * MIB);
    let q = qemu_img(["amend", "-o", "help", &s(&p)]).ok();
    let u = quring(["amend", "-o", "help", &s(&p)]).ok();
    assert_eq!(u.stdout, q.stdout);
    let u = quring(["amend", "-p", "-o", "refcount_bits=8", &s(&p)]).ok();
    assert!(u.stdout.starts_with("    (0.00/100%)\r") && u.stdout.ends_with("    (100.00/100%)\r\n"), "{:?}", u.stdout);
    check_clean(&p);
}

/// quring's identity extension survives every amend step, with the same GUIDs.
#[test]
fn identity_survives_amend() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let ov = dir.path().join("ov.qcow2");
    quring(["create", "-q", &s(&base), "4M"]).ok();
    quring(["create", "-q", "-b", "base.qcow2", "-F", "qcow2", &s(&ov)]).ok();
    quring(["io", "-c", "write -z 0 64k", "-c", "write -P 3 1M 64k", &s(&ov)]).ok();
    let id = |p: &Path| {
        let v = quring(["info", "--output=json", &s(p)]).ok().json();
        let d = v["format-specific"]["data"].clone();
        (d["guid"].clone(), d["backing-guid"].clone(), d["backing-length"].clone())
    };
    let before = id(&ov);
    assert!(before.0.is_string() && before.1.is_string(), "{before:?}");
    for o in ["compat=0.10", "compat=1.1", "refcount_bits=2", "lazy_refcounts=on", "refcount_bits=16"] {
        quring(["amend", "-o", o, &s(&ov)]).ok();
        assert_eq!(id(&ov), before, "after {o}");
        check_clean(&ov);
        // The chain still opens with its GUID check and reads the data.
        quring(["io", "-c", "read -P 3 1M 64k", "-c", "read -P 0 0 64k", &s(&ov)]).ok();
    }
}
