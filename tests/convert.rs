//! `quring convert` against `qemu-img convert` (issue 16, items 1 and 2): raw and qcow2 in
//! and out, backing chains, holes for zero runs, `-B`, `-n`, `-S`, `-c` (zlib and zstd),
//! `-p`; and `Queue::write_compressed` in the library. Every output passes `qemu-img check`,
//! compares equal to the source (`qemu-img compare`), and takes the disk space qemu-img's
//! own output takes (within 5%; compressed sizes within 1%).

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn du(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[track_caller]
fn check_clean(p: &Path) {
    let r = qemu_img(["check", &s(p)]);
    assert_eq!(r.status(), 0, "qemu-img check of quring's output:\n{}", r.describe());
}

#[track_caller]
fn same_content(a: &Path, fa: &str, b: &Path, fb: &str) {
    let r = qemu_img(["compare", "-f", fa, "-F", fb, &s(a), &s(b)]);
    assert_eq!(r.status(), 0, "{}", r.describe());
}

/// Asserts `a` is within `pct` percent of `b` (plus `slack` bytes).
#[track_caller]
fn near(what: &str, a: u64, b: u64, pct: f64, slack: u64) {
    let lim = (b as f64 * pct / 100.0) as u64 + slack;
    assert!(a <= b + lim && a + lim >= b, "{what}: quring {a}, qemu-img {b} (more than {pct}% apart)");
}

/// A 64 MiB raw file: text-like data every 3 MiB (compressible), random data at 40 MiB,
/// a zero-filled (allocated) MiB at 50 MiB, holes elsewhere.
fn sample_raw(p: &Path) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    let mut text = Vec::new();
    let mut st = 7u64;
    while text.len() < 700_000 {
        let w = splitmix64(&mut st) % 40;
        text.extend_from_slice(format!("word{w} ").as_bytes());
    }
    for i in (0..64).step_by(3) {
        f.write_all_at(&text, i * MIB).unwrap();
    }
    f.write_all_at(&pattern_bytes(3, 300_000), 40 * MIB).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], 50 * MIB).unwrap();
}

#[test]
fn raw_to_qcow2_and_back_as_sparse_as_qemu_img() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    sample_raw(&src);
    for (fmt, ext) in [("qcow2", "qcow2"), ("raw", "raw")] {
        let ours = d.path().join(format!("ours.{ext}"));
        let theirs = d.path().join(format!("theirs.{ext}"));
        quring(["convert", "-f", "raw", "-O", fmt, &s(&src), &s(&ours)]).ok();
        qemu_img(["convert", "-f", "raw", "-O", fmt, &s(&src), &s(&theirs)]).ok();
        if fmt == "qcow2" {
            check_clean(&ours);
        }
        same_content(&src, "raw", &ours, fmt);
        near(&format!("du of -O {fmt}"), du(&ours), du(&theirs), 5.0, 64 << 10);
    }
    // Without -f the source is probed (raw): no warning, it is only read.
    let probed = d.path().join("probed.qcow2");
    let r = quring(["convert", "-O", "qcow2", &s(&src), &s(&probed)]).ok();
    assert!(!r.stderr.contains("WARNING"), "{}", r.describe());
    same_content(&src, "raw", &probed, "qcow2");
}

#[test]
fn sparse_overlay_chain_to_raw_and_qcow2() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    build_qcow2(&base, &Qcow2Opts::default(), 32 * MIB, &["write -P 0x11 0 3M".into(), "write -P 0 8M 1M".into()]);
    let o = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&top, &o, 32 * MIB, &["write -P 0x22 1M 64k".into(), "write -z 2M 512k".into()]);
    for fmt in ["raw", "qcow2"] {
        let ours = d.path().join(format!("ours.{fmt}"));
        let theirs = d.path().join(format!("theirs.{fmt}"));
        quring(["convert", "-O", fmt, &s(&top), &s(&ours)]).ok();
        qemu_img(["convert", "-O", fmt, &s(&top), &s(&theirs)]).ok();
        same_content(&top, "qcow2", &ours, fmt);
        near(&format!("du of -O {fmt}"), du(&ours), du(&theirs), 5.0, 64 << 10);
        if fmt == "qcow2" {
            check_clean(&ours);
            let ours_map = quring(["map", "--output=json", &s(&ours)]).ok().stdout;
            let theirs_map = qemu_img(["map", "--output=json", &s(&theirs)]).ok().stdout;
            let alloc = |m: &str| -> u64 {
                serde_json::from_str::<serde_json::Value>(m)
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["data"] == true)
                    .map(|e| e["length"].as_u64().unwrap())
                    .sum()
            };
            assert_eq!(alloc(&ours_map), alloc(&theirs_map), "allocated data:\n{ours_map}\n{theirs_map}");
        }
    }
}

#[test]
fn backing_output_holds_only_the_top_layer() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    build_qcow2(&base, &Qcow2Opts::default(), 16 * MIB, &["write -P 0x11 0 4M".into()]);
    let o = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
    build_qcow2(&top, &o, 16 * MIB, &["write -P 0x22 1M 128k".into(), "write -z 3M 64k".into()]);
    let ours = d.path().join("ours.qcow2");
    let theirs = d.path().join("theirs.qcow2");
    let args = |out: &Path| {
        vec![
            "convert".into(),
            "-O".into(),
            "qcow2".into(),
            "-B".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            s(&top),
            s(out),
        ]
    };
    quring(args(&ours)).ok();
    qemu_img(args(&theirs)).ok();
    check_clean(&ours);
    same_content(&top, "qcow2", &ours, "qcow2");
    // The same map as qemu-img's output: only the top layer's ranges are in the overlay.
    let m = |p: &Path| qemu_img(["map", "--output=json", &s(p)]).ok().stdout;
    let strip = |j: String| -> Vec<(u64, u64, u64, bool, bool)> {
        serde_json::from_str::<serde_json::Value>(&j)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["zero"] == true,
                    e["data"] == true,
                )
            })
            .collect()
    };
    assert_eq!(strip(m(&ours)), strip(m(&theirs)));
    // qemu-img's refusals.
    let r = quring(["convert", "-O", "qcow2", "-B", "base.qcow2", &s(&top), &s(&d.path().join("x.qcow2"))]);
    assert_eq!(r.status(), 1);
    assert!(r.stderr.contains("Use of backing file requires explicit backing format"), "{}", r.describe());
    let r = quring(["convert", "-O", "raw", "-B", "base.qcow2", "-F", "qcow2", &s(&top), &s(&d.path().join("x.raw"))]);
    assert!(r.stderr.contains("Backing file not supported for file format 'raw'"), "{}", r.describe());
}

#[test]
fn existing_target_and_sparse_size() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    sample_raw(&src);
    // -n onto an existing raw file full of data: the zero runs become zeros (holes).
    let dst = d.path().join("dst.raw");
    std::fs::write(&dst, vec![0xeeu8; 64 * MIB as usize]).unwrap();
    quring(["convert", "-n", "-f", "raw", "-O", "raw", &s(&src), &s(&dst)]).ok();
    assert!(raw_bytes_equal(&src, &dst));
    // -n onto an existing qcow2 image with data.
    let q = d.path().join("dst.qcow2");
    build_qcow2(&q, &Qcow2Opts::default(), 64 * MIB, &["write -P 0xee 0 64M".into()]);
    quring(["convert", "-n", "-f", "raw", "-O", "qcow2", &s(&src), &s(&q)]).ok();
    check_clean(&q);
    same_content(&src, "raw", &q, "qcow2");
    // qemu-img's messages.
    let small = d.path().join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let r = quring(["convert", "-n", "-O", "raw", &s(&src), &s(&small)]);
    assert_eq!(r.status(), 1);
    assert!(r.stderr.contains("output file is smaller than input file"), "{}", r.describe());
    let r = quring(["convert", "-n", "-O", "raw", &s(&src), &s(&d.path().join("missing.raw"))]);
    assert!(r.stderr.contains("No such file or directory"), "{}", r.describe());
    let r = quring(["convert", "-S", "1000", &s(&src), &s(&d.path().join("x.raw"))]);
    assert!(r.stderr.contains("Invalid buffer size for sparse output specified"), "{}", r.describe());
    // -S 0: fully allocated, like qemu-img.
    let full = d.path().join("full.raw");
    let theirs = d.path().join("theirs-full.raw");
    quring(["convert", "-S", "0", "-O", "raw", &s(&src), &s(&full)]).ok();
    qemu_img(["convert", "-S", "0", "-O", "raw", &s(&src), &s(&theirs)]).ok();
    assert!(raw_bytes_equal(&src, &full));
    near("du with -S 0", du(&full), du(&theirs), 5.0, 0);
    // -S 64k leaves more allocated than the default 4k, as qemu-img does.
    let s64 = d.path().join("s64.raw");
    let t64 = d.path().join("t64.raw");
    quring(["convert", "-S", "64k", "-O", "raw", &s(&src), &s(&s64)]).ok();
    qemu_img(["convert", "-S", "64k", "-O", "raw", &s(&src), &s(&t64)]).ok();
    near("du with -S 64k", du(&s64), du(&t64), 5.0, 64 << 10);
}

#[test]
fn compressed_output_checks_clean_and_matches_qemu_img_size() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    sample_raw(&src);
    for ct in ["zlib", "zstd"] {
        for extra in ["", ",cluster_size=4096", ",extended_l2=on", ",refcount_bits=1", ",cluster_size=2M"] {
            let o = format!("compression_type={ct}{extra}");
            let ours = d.path().join(format!("ours-{ct}.qcow2"));
            let theirs = d.path().join(format!("theirs-{ct}.qcow2"));
            quring(["convert", "-c", "-o", &o, "-O", "qcow2", &s(&src), &s(&ours)]).ok();
            qemu_img(["convert", "-c", "-o", &o, "-f", "raw", "-O", "qcow2", &s(&src), &s(&theirs)]).ok();
            check_clean(&ours);
            same_content(&src, "raw", &ours, "qcow2");
            let info = qemu_img(["check", "--output=json", &s(&ours)]).ok().json();
            let theirs_info = qemu_img(["check", "--output=json", &s(&theirs)]).ok().json();
            assert_eq!(info["compressed-clusters"], theirs_info["compressed-clusters"], "-o {o}");
            near(&format!("file length with -o {o}"), len(&ours), len(&theirs), 1.0, 64 << 10);
        }
    }
    let r = quring(["convert", "-c", "-O", "raw", &s(&src), &s(&d.path().join("c.raw"))]);
    assert!(r.stderr.contains("Compression not supported for this file format"), "{}", r.describe());
}

/// 6 MiB of mixed real data, no holes: this test program's own bytes (a binary), text,
/// noise, and a zero run, so that clusters compress well, badly and not at all.
fn mixed_raw(p: &Path) {
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let mut v = Vec::with_capacity(6 * MIB as usize);
    v.extend_from_slice(&exe[..exe.len().min(3 * MIB as usize)]);
    let mut st = 11u64;
    while v.len() < 4 * MIB as usize {
        let w = splitmix64(&mut st) % 300;
        v.extend_from_slice(format!("line {w}: the quick brown fox {}\n", w * 7).as_bytes());
    }
    v.truncate(4 * MIB as usize);
    v.extend_from_slice(&pattern_bytes(5, MIB as usize));
    v.resize(6 * MIB as usize - 100_000, 0);
    v.extend_from_slice(&exe[..100_000.min(exe.len())]);
    v.resize(6 * MIB as usize, 1);
    std::fs::write(p, &v).unwrap();
}

#[test]
fn compressed_mixed_data_decompresses_in_qemu_with_every_deflate_profile() {
    // Both deflate profiles (QEMU's zlib parameters and the faster zlib-rs one) on two
    // queues: QEMU reads every cluster back equal and checks the image clean; the QEMU
    // profile writes qemu-img's size (its bytes), the fast one at most 2% more.
    let d = tempdir();
    let src = d.path().join("mixed.raw");
    mixed_raw(&src);
    let theirs = d.path().join("theirs.qcow2");
    qemu_img(["convert", "-c", "-m", "2", "-f", "raw", "-O", "qcow2", &s(&src), &s(&theirs)]).ok();
    for profile in ["qemu", "fast"] {
        let ours = d.path().join(format!("ours-{profile}.qcow2"));
        let mut cmd = std::process::Command::new(quring_bin());
        cmd.env("QURING_DEFLATE", profile).args(["convert", "-c", "-m", "2", "-f", "raw", "-O", "qcow2"]);
        run(cmd.args([s(&src), s(&ours)])).ok();
        check_clean(&ours);
        same_content(&src, "raw", &ours, "qcow2");
        let info = qemu_img(["check", "--output=json", &s(&ours)]).ok().json();
        let theirs_info = qemu_img(["check", "--output=json", &s(&theirs)]).ok().json();
        assert!(info["compressed-clusters"].as_u64().unwrap() > 40, "{profile}: {info}");
        assert_eq!(info["compressed-clusters"], theirs_info["compressed-clusters"], "{profile}");
        let (a, b) = (len(&ours), len(&theirs));
        if profile == "qemu" {
            near("qemu profile: file length", a, b, 1.0, 64 << 10);
        } else {
            assert!(a * 100 <= b * 102, "fast profile: {a} bytes against qemu-img's {b}");
        }
    }
}

#[test]
fn progress_goes_to_stdout_like_qemu_img() {
    let d = tempdir();
    let src = d.path().join("src.raw");
    sample_raw(&src);
    let r = quring(["convert", "-p", "-O", "qcow2", &s(&src), &s(&d.path().join("o.qcow2"))]).ok();
    assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{:?}", r.stdout);
    assert!(r.stdout.ends_with("    (100.00/100%)\r\n"), "{:?}", r.stdout);
    let q = qemu_img(["convert", "-p", "-O", "qcow2", &s(&src), &s(&d.path().join("q.qcow2"))]).ok();
    assert!(q.stdout.starts_with("    (0.00/100%)\r") && q.stdout.ends_with("    (100.00/100%)\r\n"));
}

/// Writes through `Queue::write_compressed` and checks the image in QEMU.
fn library_compressed(opts: &Qcow2Opts, size: u64) {
    let d = tempdir();
    let p = d.path().join("c.qcow2");
    create_qcow2(&p, opts, size);
    let cs = opts.cluster_size as usize;
    let img = Image::open(&p, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut text = Vec::new();
    let mut st = 1u64;
    while text.len() < 4 * cs {
        text.extend_from_slice(format!("line {} ", splitmix64(&mut st) % 100).as_bytes());
    }
    text.truncate(4 * cs);
    // Compressible clusters, one that does not compress (stored whole), and zeros.
    q.write_compressed(0, &text).unwrap();
    q.write_compressed(4 * cs as u64, &pattern_bytes(9, cs)).unwrap();
    q.write_compressed(6 * cs as u64, &vec![0u8; cs]).unwrap();
    q.write_compressed(8 * cs as u64, &text[..cs]).unwrap();
    // QEMU's rule: compression never overwrites an allocated cluster.
    assert!(q.write_compressed(0, &text[..cs]).is_err());
    // Misaligned requests are refused.
    assert!(q.write_compressed(512, &text[..cs]).is_err());
    let mut back = vec![0u8; 4 * cs];
    q.read_at(&mut back, 0).unwrap();
    assert_eq!(back, text);
    q.flush().unwrap();
    drop(q);
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    let raw = d.path().join("expect.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&text, 0).unwrap();
    f.write_all_at(&pattern_bytes(9, cs), 4 * cs as u64).unwrap();
    f.write_all_at(&text[..cs], 8 * cs as u64).unwrap();
    same_content(&raw, "raw", &p, "qcow2");
    let c = qemu_img(["check", "--output=json", &s(&p)]).ok().json();
    assert!(c["compressed-clusters"].as_u64().unwrap() >= 5, "{opts:?}: {c}");
}

#[test]
fn write_compressed_in_the_library() {
    for opts in [
        Qcow2Opts::default(),
        Qcow2Opts { compression_type: Some("zstd"), ..Default::default() },
        Qcow2Opts::cluster(512),
        Qcow2Opts::cluster(4096),
        Qcow2Opts::cluster(2 << 20),
        Qcow2Opts { extended_l2: true, ..Default::default() },
        Qcow2Opts { refcount_bits: 1, ..Default::default() },
        Qcow2Opts { refcount_bits: 64, ..Default::default() },
        Qcow2Opts { compat: Compat::V010, ..Default::default() },
    ] {
        let size = (16 * opts.cluster_size as u64).max(MIB);
        library_compressed(&opts, size);
    }
}
