//! Differential tests against `qemu-img check` (10.0.2): images are made with qemu-img and
//! qemu-io, optionally damaged by patching bytes, then both checkers run and must agree on
//! the exit status, the counts, the JSON and human output and the problem messages.

use super::report::json_escape;
use super::*;
use crate::format::HostCluster;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct FileMeta(File);

impl MetaRead for FileMeta {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.0.read_at(buf, off).map_err(|e| Error::io("pread", e))
    }
    fn len(&self) -> u64 {
        self.0.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([ps, size]);
    run("qemu-img", &args);
    p
}

fn qio(p: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p.to_str().unwrap());
    run("qemu-io", &args);
}

struct Qemu {
    code: i32,
    json_text: String,
    json: serde_json::Value,
    human: String,
    messages: Vec<String>,
}

fn qemu_check(p: &Path) -> Qemu {
    let ps = p.to_str().unwrap();
    let j = Command::new("qemu-img").args(["check", "--output=json", ps]).output().unwrap();
    let h = Command::new("qemu-img").args(["check", ps]).output().unwrap();
    assert_eq!(j.status.code(), h.status.code());
    let json_text = String::from_utf8(j.stdout).unwrap();
    Qemu {
        code: h.status.code().unwrap(),
        json: serde_json::from_str(&json_text).unwrap_or(serde_json::Value::Null),
        json_text,
        human: String::from_utf8(h.stdout).unwrap(),
        messages: String::from_utf8(h.stderr)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("qemu-img: "))
            .map(str::to_string)
            .collect(),
    }
}

fn ours(p: &Path) -> Result<CheckReport> {
    check(&FileMeta(File::open(p).unwrap()))
}

/// Runs both checkers and asserts they agree; returns our report.
fn agree(p: &Path) -> CheckReport {
    let q = qemu_check(p);
    let r = ours(p).unwrap_or_else(|e| panic!("{}: {e}; qemu: {}", p.display(), q.human));
    let ctx = format!(
        "{}\nqemu stderr:\n{}\nqemu stdout:\n{}\nours:\n{}",
        p.display(),
        q.messages.join("\n"),
        q.human,
        r.to_human()
    );
    assert_eq!(r.exit_code(), q.code, "exit code: {ctx}");
    for (k, v) in [("corruptions", r.corruptions), ("leaks", r.leaks), ("check-errors", r.check_errors)] {
        assert_eq!(q.json[k].as_u64().unwrap_or(0), v, "{k}: {ctx}");
    }
    let mut mine: serde_json::Value = serde_json::from_str(&r.to_json("x")).unwrap();
    let mut theirs = q.json.clone();
    mine.as_object_mut().unwrap().remove("filename");
    theirs.as_object_mut().unwrap().remove("filename");
    assert_eq!(mine, theirs, "json: {ctx}");
    assert_eq!(r.to_json(p.to_str().unwrap()), q.json_text, "json text: {ctx}");
    assert_eq!(r.summary_human(), q.human, "human: {ctx}");
    assert_eq!(r.messages, q.messages, "messages: {ctx}");
    r
}

fn header(p: &Path) -> Header {
    let f = File::open(p).unwrap();
    let mut b = vec![0u8; 2 << 20];
    let n = f.read_at(&mut b, 0).unwrap();
    Header::parse(&b[..n], u64::MAX).unwrap()
}

fn rd64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn wr64(p: &Path, off: u64, v: u64) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// File offset of the L2 entry mapping guest offset `goff`.
fn l2_pos(p: &Path, goff: u64) -> u64 {
    let h = header(p);
    let g = h.geometry();
    let c = g.guest_cluster(crate::format::GuestOffset(goff));
    let l1e = rd64(p, h.l1_table_offset.0 + 8 * g.l1_index(c));
    (l1e & OFFSET_MASK) + g.l2_index(c) * g.l2_entry_size()
}

/// File offset of the L1 entry for guest offset `goff`.
fn l1_pos(p: &Path, goff: u64) -> u64 {
    let h = header(p);
    let g = h.geometry();
    let c = g.guest_cluster(crate::format::GuestOffset(goff));
    h.l1_table_offset.0 + 8 * g.l1_index(c)
}

fn set_refcount(p: &Path, cluster: u64, v: u64) {
    let h = header(p);
    let g = h.geometry();
    let hc = HostCluster(cluster);
    let block = rd64(p, h.refcount_table_offset.0 + 8 * g.reftable_index(hc)) & !0x1ff;
    assert_ne!(block, 0);
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = vec![0u8; g.cluster_size() as usize];
    f.read_exact_at(&mut b, block).unwrap();
    refcount::set(&mut b, g.refblock_index(hc), g.refcount_order, v);
    f.write_all_at(&b, block).unwrap();
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 200k",
    "write -P 0x33 300k 8k",
    "write -P 0x44 3M 4k",
    "write -z 1M 64k",
    "write -P 0x55 5M 1M",
];

#[test]
fn clean_cluster_sizes() {
    let d = tmp();
    for cs in ["512", "1k", "4k", "16k", "64k", "256k", "2M"] {
        let p = create(d.path(), &format!("cs{cs}.qcow2"), &format!("cluster_size={cs}"), "64M");
        assert_eq!(agree(&p).exit_code(), 0);
        qio(&p, WRITES);
        let r = agree(&p);
        assert_eq!(r.exit_code(), 0);
        assert!(r.allocated_clusters > 0);
    }
}

#[test]
fn clean_refcount_widths() {
    let d = tmp();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        for cs in ["512", "64k"] {
            let p = create(
                d.path(),
                &format!("rb{bits}-{cs}.qcow2"),
                &format!("refcount_bits={bits},cluster_size={cs}"),
                "32M",
            );
            qio(&p, WRITES);
            assert_eq!(agree(&p).exit_code(), 0);
        }
    }
}

#[test]
fn clean_extended_l2() {
    let d = tmp();
    for cs in ["16k", "64k", "2M"] {
        let p = create(d.path(), &format!("ext{cs}.qcow2"), &format!("extended_l2=on,cluster_size={cs}"), "64M");
        qio(
            &p,
            &[
                "write -P 1 4k 4k",
                "write -P 2 1M 512k",
                "write -z 2M 64k",
                "write -z 3M 4k",
                "write -P 3 5M 2M",
                "write -z 5M 4k",
            ],
        );
        assert_eq!(agree(&p).exit_code(), 0);
    }
}

#[test]
fn clean_compressed_and_v2_and_prealloc() {
    let d = tmp();
    let raw = d.path().join("src.raw");
    {
        let f = File::create(&raw).unwrap();
        f.set_len(8 << 20).unwrap();
        for i in 0..40u64 {
            let pat: Vec<u8> = (0..70_000u32).map(|x| (x % 251) as u8 ^ i as u8).collect();
            f.write_all_at(&pat, i * 150_000).unwrap();
        }
    }
    let rs = raw.to_str().unwrap();
    for (name, opts) in [
        ("c64k.qcow2", "cluster_size=64k"),
        ("c4k.qcow2", "cluster_size=4k"),
        ("c512.qcow2", "cluster_size=512"),
        ("c2m.qcow2", "cluster_size=2M"),
        ("czstd.qcow2", "compression_type=zstd"),
        ("cext.qcow2", "extended_l2=on"),
        ("crb1.qcow2", "refcount_bits=1"),
    ] {
        let p = d.path().join(name);
        run("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", opts, rs, p.to_str().unwrap()]);
        let r = agree(&p);
        assert_eq!(r.exit_code(), 0);
        assert!(r.compressed_clusters > 0);
        // Mix compressed and normal clusters.
        qio(&p, &["write -P 9 300k 100k"]);
        agree(&p);
    }
    let p = create(d.path(), "v2.qcow2", "compat=0.10", "64M");
    qio(&p, WRITES);
    assert_eq!(agree(&p).exit_code(), 0);
    for (name, opts) in [
        ("pm.qcow2", "preallocation=metadata"),
        ("pm512.qcow2", "preallocation=metadata,cluster_size=512"),
        ("pmext.qcow2", "preallocation=metadata,extended_l2=on"),
        ("pf.qcow2", "preallocation=falloc,cluster_size=2M"),
    ] {
        let p = create(d.path(), name, opts, "20M");
        assert_eq!(agree(&p).exit_code(), 0);
        qio(&p, &["write -P 1 0 1M", "write -z 4M 64k"]);
        assert_eq!(agree(&p).exit_code(), 0);
    }
}

mod damage;
