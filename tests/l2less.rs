//! quring's L2-less ranges (docs/l2-less.md): QEMU refuses the images by the feature's
//! name; quring's writes, read back through a conversion to the standard layout, equal a
//! raw reference written by qemu-io; `quring check` and (after conversion) `qemu-img check`
//! are clean; mixed images (backing file, split ranges) work.

mod common;

use common::*;
use std::path::Path;

fn cmds_for(seed: u64, size: u64) -> Vec<String> {
    let mut st = seed;
    let mut out = Vec::new();
    for _ in 0..40 {
        let r = splitmix64(&mut st);
        let len = match r % 4 {
            0 => 512 * (1 + splitmix64(&mut st) % 8),
            1 => 4096 * (1 + splitmix64(&mut st) % 32),
            2 => 65536 * (1 + splitmix64(&mut st) % 16),
            _ => 1 + splitmix64(&mut st) % 9000,
        };
        let off = splitmix64(&mut st) % (size - len);
        let unaligned = r % 4 == 3;
        let off = if unaligned { off } else { off / 512 * 512 };
        let cmd = match (r >> 8) % 10 {
            0 if !unaligned => format!("write -z {off} {len}"),
            1 if !unaligned => format!("write -z -u {off} {len}"),
            // Discard is only defined for whole clusters in qcow2 (partial ones are
            // ignored) while a raw file punches any sector: use 2 MiB-aligned discards.
            2 if !unaligned => {
                let doff = off / (2 << 20) * (2 << 20);
                let dlen = ((len / (2 << 20)).max(1) * (2 << 20)).min(size - doff);
                format!("discard {doff} {dlen}")
            }
            3 => "flush".to_string(),
            _ => format!("write -P {} {off} {len}", splitmix64(&mut st) % 255 + 1),
        };
        out.push(cmd);
    }
    out
}

fn apply_quring(img: &Path, cmds: &[String]) {
    let mut args = vec!["io".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(img));
    let r = quring(&args);
    assert_eq!(r.status(), 0, "{}", r.describe());
}

fn apply_raw(raw: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(raw));
    let r = qemu_io(&args);
    assert_eq!(r.status(), 0, "{}", r.describe());
}

/// Converts back to the standard layout, checks it with QEMU and compares with `raw`.
fn verify_against_raw(dir: &Path, img: &Path, raw: &Path, what: &str) {
    let chk = quring(["check", &s(img)]);
    assert_eq!(chk.status(), 0, "[{what}] quring check:\n{}", chk.describe());
    let std = dir.join(format!("{what}-std.qcow2"));
    let r = quring(["convert", "-O", "qcow2", &s(img), &s(&std)]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let chk = qemu_img(["check", &s(&std)]);
    assert_eq!(chk.status(), 0, "[{what}] qemu-img check of the converted image:\n{}", chk.describe());
    let cmp = qemu_img(["compare", "-f", "qcow2", "-F", "raw", &s(&std), &s(raw)]);
    assert_eq!(cmp.status(), 0, "[{what}] content differs from the raw reference:\n{}", cmp.describe());
}

#[test]
fn qemu_refuses_with_the_feature_name() {
    let dir = tempdir();
    let img = dir.path().join("l.qcow2");
    let r = quring(["create", "-q", "-o", "l2_less=on", &s(&img), "64M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let r = quring(["io", "-c", "write -P 7 0 1M", &s(&img)]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let info = qemu_img(["info", &s(&img)]);
    assert_ne!(info.status(), 0, "{}", info.describe());
    assert!(info.stderr.contains("quring l2-less ranges"), "{}", info.describe());
}

#[test]
fn differential_against_raw() {
    let dir = tempdir();
    for (i, (opts, size)) in [
        ("l2_less=on,refcount_bits=1", 96u64 << 20),
        ("l2_less=on,cluster_size=4k", 24 << 20),
        ("l2_less=on,cluster_size=64k,extended_l2=on", 80 << 20),
        ("l2_less=on,cluster_size=512,refcount_bits=64", 3 << 20),
        ("l2_less=on,lazy_refcounts=on", 64 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("case{i}");
        let img = dir.path().join(format!("{what}.qcow2"));
        let raw = dir.path().join(format!("{what}.raw"));
        let r = quring(["create", "-q", "-o", opts, &s(&img), &size.to_string()]);
        assert_eq!(r.status(), 0, "{}", r.describe());
        qemu_img_ok(&["create", "-q", "-f", "raw", &s(&raw), &size.to_string()]);
        for round in 0..3u64 {
            let cmds = cmds_for(1000 * i as u64 + round, size);
            apply_quring(&img, &cmds);
            apply_raw(&raw, &cmds);
        }
        verify_against_raw(dir.path(), &img, &raw, &what);
    }
}

#[test]
fn convert_roundtrip_and_mixed_backing() {
    let dir = tempdir();
    let d = dir.path();
    // A standard image made by QEMU, converted to L2-less and back.
    let src = d.join("src.qcow2");
    build_qcow2(
        &src,
        &Qcow2Opts::default(),
        40 << 20,
        &["write -P 1 0 3M".into(), "write -P 2 20M 64k".into(), "write -z 30M 1M".into()],
    );
    let raw = d.join("src.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&src), &s(&raw)]);
    let l2l = d.join("l2l.qcow2");
    let r = quring(["convert", "-O", "qcow2", "-o", "l2_less=on", &s(&src), &s(&l2l)]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    verify_against_raw(d, &l2l, &raw, "roundtrip");

    // An L2-less overlay over a backing file: ranges keep L2 tables (mixed image).
    let ov = d.join("ov.qcow2");
    let r = quring(["create", "-q", "-o", "l2_less=on", "-b", "src.qcow2", "-F", "qcow2", &s(&ov)]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let cmds = cmds_for(77, 40 << 20);
    apply_quring(&ov, &cmds);
    apply_raw(&raw, &cmds);
    verify_against_raw(d, &ov, &raw, "overlay");
}

fn qemu_img_ok(args: &[&str]) {
    let r = qemu_img(args);
    assert_eq!(r.status(), 0, "{}", r.describe());
}
