//! Interop read matrix: images written by QEMU (qemu-img/qemu-io) must read
//! back through quring exactly as through QEMU.
//!
//! For every image: `quring convert -O raw` is byte-identical to
//! `qemu-img convert -O raw`, `quring map --output=json` equals
//! `qemu-img map --output=json` (as JSON values), `quring check` exits like
//! `qemu-img check`, and `quring info --output=json` agrees with qemu-img on
//! the basic geometry and format-specific fields.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A built test image and where to run the tools from.
struct Built {
    _dir: tempfile::TempDir,
    /// Image path as passed to the tools (may be relative to `cwd`).
    img: String,
    /// Working directory for every tool invocation.
    cwd: PathBuf,
    /// Scratch directory for outputs.
    scratch: PathBuf,
}

/// Fresh directory layout: `root/img` for images, `root/elsewhere` as the
/// working directory, `root/scratch` for outputs.
fn layout() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let d = tempdir();
    let img = d.path().join("img");
    let elsewhere = d.path().join("elsewhere");
    let scratch = d.path().join("scratch");
    for p in [&img, &elsewhere, &scratch] {
        std::fs::create_dir_all(p).unwrap();
    }
    (d, img, elsewhere, scratch)
}

/// A varied qemu-io write workload for a disk of `size` bytes with cluster
/// size `cs`. `seed` selects patterns; `pat_file` (>= 4 * cs bytes of
/// pseudo-random data) is used with `write -s`. `ext_l2` only changes where
/// the L2-boundary-crossing writes go.
fn workload(cs: u64, size: u64, seed: usize, pat_file: &Path, ext_l2: bool) -> Vec<String> {
    let p = |i: usize| format!("0x{:02x}", pattern_byte(seed * 16 + i));
    let pf = s(pat_file);
    let slot = |k: u64| k * cs;
    assert!(slot(17) <= size, "disk too small for the workload");
    let mut c = vec![
        // Aligned full cluster.
        format!("write -P {} {} {}", p(0), slot(0), cs),
        // Partial overwrite inside it.
        format!("write -P {} {} {}", p(1), cs / 4, cs / 4),
        // Unaligned write spanning two clusters.
        format!("write -P {} {} {}", p(2), slot(1) + cs / 2 + 7, cs + 100),
        // Pseudo-random data, unaligned, spanning three clusters.
        format!("write -s {pf} {} {}", slot(3) + 123, 2 * cs + 1000),
        // One sector into a fresh cluster (rest must read as zeros).
        format!("write -P {} {} 512", p(3), slot(5) + 1024.min(cs / 2)),
        // Odd-sized tiny write.
        format!("write -P {} {} 3", p(4), slot(6) + 1),
        // Zero write on unallocated space.
        format!("write -z {} {}", slot(7), cs),
        // Data, then zero over it without unmap (zero flag + allocation).
        format!("write -P {} {} {}", p(5), slot(8), 2 * cs),
        format!("write -z {} {}", slot(8), cs),
        // ... and with unmap.
        format!("write -z -u {} {}", slot(9), cs),
        // Data, then an unaligned zero write inside it.
        format!("write -s {pf} {} {}", slot(10), 2 * cs),
        format!("write -z {} {}", slot(10) + 100, 3000.min(cs)),
        // Data, then discards: full cluster and partial.
        format!("write -P {} {} {}", p(6), slot(12), 2 * cs),
        format!("discard {} {}", slot(12), cs),
        format!("discard {} 512", slot(13) + 512),
        // Unaligned zero write spanning a cluster boundary.
        format!("write -P {} {} {}", p(7), slot(14), 2 * cs),
        format!("write -z {} {}", slot(15) - 700, 1400),
        // The very end of the disk.
        format!("write -P {} {} {}", p(8), size - cs - 333, cs + 333),
    ];
    // Cross an L2 table boundary if the disk has more than one.
    let l2_cover = cs * (cs / if ext_l2 { 16 } else { 8 });
    if l2_cover + 2000 < size - cs - 333 && l2_cover > slot(17) {
        c.push(format!("write -P {} {} 1400", p(9), l2_cover - 700));
        c.push(format!("write -s {pf} {} {}", 3 * l2_cover / 2 + 11, cs + 5));
    }
    if size > 4 * slot(17) {
        c.push(format!("write -P {} {} 4000", p(10), size / 2 + 4097));
    }
    c
}

fn pattern_file(dir: &Path, seed: u64, cs: u64) -> PathBuf {
    let p = dir.join(format!("pattern-{seed}.bin"));
    write_pattern_file(&p, seed, (4 * cs).max(64 * KIB) as usize);
    p
}

/// An image made with `opts`, `size`, the standard workload plus `extra`
/// qemu-io commands.
fn standard(opts: Qcow2Opts, size: u64, extra: &[String]) -> Built {
    let (d, imgdir, elsewhere, scratch) = layout();
    let img = imgdir.join("test.qcow2");
    let cs = opts.cluster_size as u64;
    let pf = pattern_file(&scratch, 1, cs);
    let mut cmds = workload(cs, size, 1, &pf, opts.extended_l2);
    cmds.extend_from_slice(extra);
    build_qcow2(&img, &opts, size, &cmds);
    Built { _dir: d, img: s(&img), cwd: elsewhere, scratch }
}

fn opts(cs: u32, refcount_bits: u32) -> Qcow2Opts {
    Qcow2Opts { cluster_size: cs, refcount_bits, ..Default::default() }
}

fn v2(cs: u32) -> Qcow2Opts {
    Qcow2Opts { cluster_size: cs, compat: Compat::V010, ..Default::default() }
}

fn extl2(cs: u32, refcount_bits: u32) -> Qcow2Opts {
    Qcow2Opts { cluster_size: cs, refcount_bits, extended_l2: true, ..Default::default() }
}

// ---------------------------------------------------------------------------
// Verification

fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    if out.len() > 10 {
        return;
    }
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                match (x.get(i), y.get(i)) {
                    (Some(u), Some(v)) => json_diff(&format!("{path}[{i}]"), u, v, out),
                    (u, v) => out.push(format!("{path}[{i}]: quring {u:?} / qemu {v:?}")),
                }
            }
        }
        _ if a != b => out.push(format!("{path}: quring {a} / qemu {b}")),
        _ => {}
    }
}

/// Runs every comparison; returns the list of mismatches.
fn verify(b: &Built) -> Vec<String> {
    let mut errs = Vec::new();
    let img = b.img.as_str();
    let cwd = b.cwd.as_path();

    // Data.
    let q_raw = b.scratch.join("qemu.raw");
    let r_raw = b.scratch.join("quring.raw");
    run_in(cwd, "qemu-img", ["convert", "-O", "raw", img, &s(&q_raw)]).ok();
    let r = quring_in(cwd, ["convert", "-O", "raw", img, &s(&r_raw)]);
    if !r.success() {
        errs.push(format!("quring convert failed:\n{}", r.describe()));
    } else if !r_raw.exists() {
        errs.push(format!("quring convert exited 0 but wrote no output file:\n{}", r.describe()));
    } else {
        match first_difference(&r_raw, &q_raw) {
            Ok(None) => {}
            Ok(Some(off)) => errs.push(format!(
                "raw output differs from qemu-img's at byte {off:#x} (quring len {}, qemu len {})",
                file_len(&r_raw),
                file_len(&q_raw)
            )),
            Err(e) => errs.push(format!("comparing raw outputs: {e}")),
        }
    }
    let _ = std::fs::remove_file(&q_raw);
    let _ = std::fs::remove_file(&r_raw);

    // Map.
    let qm = run_in(cwd, "qemu-img", ["map", "--output=json", img]).ok();
    let rm = quring_in(cwd, ["map", "--output=json", img]);
    if !rm.success() {
        errs.push(format!("quring map failed:\n{}", rm.describe()));
    } else {
        match serde_json::from_str::<Value>(&rm.stdout) {
            Err(e) => errs.push(format!("quring map output is not JSON ({e}):\n{}", rm.describe())),
            Ok(rv) => {
                let qv = qm.json();
                if rv != qv {
                    let mut d = Vec::new();
                    json_diff("map", &rv, &qv, &mut d);
                    errs.push(format!("map differs from qemu-img map:\n  {}", d.join("\n  ")));
                }
            }
        }
    }

    // Check.
    let qc = run_in(cwd, "qemu-img", ["check", img]);
    let rc = quring_in(cwd, ["check", img]);
    if rc.code != qc.code {
        errs.push(format!(
            "check exit {:?} != qemu-img check exit {:?}:\n{}\n{}",
            rc.code,
            qc.code,
            rc.describe(),
            qc.describe()
        ));
    }

    // Info.
    let qi = run_in(cwd, "qemu-img", ["info", "--output=json", img]).ok().json();
    let ri = quring_in(cwd, ["info", "--output=json", img]);
    if !ri.success() {
        errs.push(format!("quring info failed:\n{}", ri.describe()));
    } else {
        match serde_json::from_str::<Value>(&ri.stdout) {
            Err(e) => errs.push(format!("quring info output is not JSON ({e}):\n{}", ri.describe())),
            Ok(rv) => {
                for k in ["virtual-size", "cluster-size", "format"] {
                    if rv.get(k) != qi.get(k) {
                        errs.push(format!("info {k}: quring {:?} / qemu {:?}", rv.get(k), qi.get(k)));
                    }
                }
                let qd = &qi["format-specific"]["data"];
                let rd = &rv["format-specific"]["data"];
                for k in ["compat", "refcount-bits", "extended-l2", "lazy-refcounts", "compression-type"] {
                    if let Some(qv) = qd.get(k)
                        && rd.get(k) != Some(qv)
                    {
                        errs.push(format!("info format-specific.data.{k}: quring {:?} / qemu {qv}", rd.get(k)));
                    }
                }
            }
        }
    }
    errs
}

#[track_caller]
fn assert_interop(name: &str, b: Built) {
    let errs = verify(&b);
    assert!(
        errs.is_empty(),
        "[{name}] image {} (cwd {}): {} mismatch(es):\n{}",
        b.img,
        b.cwd.display(),
        errs.len(),
        errs.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Sanity checks that an image really exercises what its test is about.

fn qemu_map(b: &Built) -> Vec<Value> {
    let v = run_in(&b.cwd, "qemu-img", ["map", "--output=json", &b.img]).ok().json();
    v.as_array().expect("map is an array").clone()
}

#[track_caller]
fn assert_has_compressed(b: &Built) {
    assert!(
        qemu_map(b).iter().any(|e| e["compressed"] == Value::Bool(true)),
        "test image {} has no compressed clusters",
        b.img
    );
}

#[track_caller]
fn assert_has_zero_flag(b: &Built) {
    assert!(
        qemu_map(b).iter().any(|e| e["present"] == Value::Bool(true)
            && e["zero"] == Value::Bool(true)
            && e["data"] == Value::Bool(false)),
        "test image {} has no zero clusters",
        b.img
    );
}

#[track_caller]
fn assert_snapshots(img: &Path, n: usize) {
    let info = qemu_img(["info", "--output=json", &s(img)]).ok().json();
    let got = info["snapshots"].as_array().map_or(0, |a| a.len());
    assert_eq!(got, n, "snapshot count of {}", img.display());
}

#[track_caller]
fn assert_max_depth(b: &Built, depth: u64) {
    let max = qemu_map(b).iter().filter_map(|e| e["depth"].as_u64()).max().unwrap_or(0);
    assert_eq!(max, depth, "deepest map layer of {}", b.img);
}

// ---------------------------------------------------------------------------
// The matrix. Every cluster size, refcount width, extended_l2 value and
// compat level appears at least once; combinations are chosen, not crossed.

#[test]
fn c512_r16_compat010() {
    assert_interop("c512_r16_compat010", standard(v2(512), 4 * MIB, &[]));
}

#[test]
fn c512_r1_multi_cluster_l1() {
    // 64 MiB with 512-byte clusters: 2048 L1 entries (32-cluster L1 table),
    // each L2 table covers only 32 KiB.
    let extra: Vec<String> = (0..12)
        .map(|i| format!("write -P 0x{:02x} {} 1536", pattern_byte(100 + i), i as u64 * 5 * MIB + 32 * KIB - 700))
        .collect();
    assert_interop("c512_r1_multi_cluster_l1", standard(opts(512, 1), 64 * MIB, &extra));
}

#[test]
fn c512_r64_compressed_writes() {
    let extra = vec![
        "write -c -P 0x71 16384 512".to_string(),
        "write -c -P 0x72 17408 2048".to_string(),
        // Partially overwrite a compressed cluster.
        "write -P 0x73 17500 100".to_string(),
    ];
    let b = standard(opts(512, 64), 4 * MIB, &extra);
    assert_has_compressed(&b);
    assert_interop("c512_r64_compressed_writes", b);
}

#[test]
fn c4k_r2_snapshots() {
    let (d, imgdir, elsewhere, scratch) = layout();
    let img = imgdir.join("snap.qcow2");
    let o = opts(4096, 2);
    let pf = pattern_file(&scratch, 2, 4096);
    build_qcow2(&img, &o, 8 * MIB, &workload(4096, 8 * MIB, 2, &pf, false));
    qemu_img(["snapshot", "-q", "-c", "first", &s(&img)]).ok();
    // Overwrite some shared clusters (COW), allocate new ones.
    let pf2 = pattern_file(&scratch, 3, 4096);
    qemu_io_cmds(&img, "qcow2", &workload(4096, 8 * MIB, 3, &pf2, false)[..8]);
    qemu_img(["snapshot", "-q", "-c", "second", &s(&img)]).ok();
    qemu_io_cmds(
        &img,
        "qcow2",
        &["write -P 0x99 0 12k".into(), "discard 32768 8192".into(), "write -z 40960 4096".into()],
    );
    assert_snapshots(&img, 2);
    assert_interop("c4k_r2_snapshots", Built { _dir: d, img: s(&img), cwd: elsewhere, scratch });
}

#[test]
fn c4k_r8_lazy_dirty() {
    // lazy_refcounts=on and a qemu-io that abort()s: the dirty bit stays set
    // and the refcounts are stale (qemu-img check reports corruption).
    let (d, imgdir, elsewhere, scratch) = layout();
    let img = imgdir.join("dirty.qcow2");
    let o = Qcow2Opts { lazy_refcounts: true, ..opts(4096, 8) };
    create_qcow2(&img, &o, 4 * MIB);
    let pf = pattern_file(&scratch, 4, 4096);
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for c in workload(4096, 4 * MIB, 4, &pf, false) {
        args.extend(["-c".into(), c]);
    }
    args.extend(["-c".into(), "abort".into(), s(&img)]);
    // Run in the scratch dir so a core file (if any) lands there.
    let r = run_in(&scratch, "qemu-io", &args);
    assert_eq!(r.signal, Some(libc::SIGABRT), "{}", r.describe());
    let info = qemu_img(["info", "--output=json", &s(&img)]).ok().json();
    assert_eq!(info["dirty-flag"], Value::Bool(true), "image is not dirty");
    assert_interop("c4k_r8_lazy_dirty", Built { _dir: d, img: s(&img), cwd: elsewhere, scratch });
}

#[test]
fn c4k_r16_lazy_clean() {
    let o = Qcow2Opts { lazy_refcounts: true, ..opts(4096, 16) };
    let b = standard(o, 16 * MIB, &[]);
    assert_has_zero_flag(&b);
    assert_interop("c4k_r16_lazy_clean", b);
}

#[test]
fn c4k_r32_prealloc_metadata() {
    let o = Qcow2Opts { preallocation: Some("metadata"), ..opts(4096, 32) };
    assert_interop("c4k_r32_prealloc_metadata", standard(o, 8 * MIB, &[]));
}

#[test]
fn c4k_compat010_snapshot() {
    let (d, imgdir, elsewhere, scratch) = layout();
    let img = imgdir.join("v2snap.qcow2");
    let pf = pattern_file(&scratch, 5, 4096);
    build_qcow2(&img, &v2(4096), 4 * MIB, &workload(4096, 4 * MIB, 5, &pf, false));
    qemu_img(["snapshot", "-q", "-c", "s1", &s(&img)]).ok();
    qemu_io_cmds(
        &img,
        "qcow2",
        &["write -P 0x3c 2048 8192".into(), "write -z 32768 4096".into(), "discard 49152 4096".into()],
    );
    assert_snapshots(&img, 1);
    assert_interop("c4k_compat010_snapshot", Built { _dir: d, img: s(&img), cwd: elsewhere, scratch });
}

#[test]
fn c16k_extl2_r1() {
    let b = standard(extl2(16384, 1), 4 * MIB, &[]);
    assert_has_zero_flag(&b);
    assert_interop("c16k_extl2_r1", b);
}

#[test]
fn c64k_r16_default() {
    let b = standard(opts(65536, 16), 16 * MIB, &[]);
    assert_has_zero_flag(&b);
    assert_interop("c64k_r16_default", b);
}

#[test]
fn c64k_extl2_r4_subclusters() {
    // Subcluster-granular writes: 2 KiB subclusters.
    let extra = vec![
        "write -P 0x41 1179648 2048".to_string(),
        "write -P 0x42 1185792 100".to_string(),
        "write -z 1191936 4096".to_string(),
        "write -P 0x43 1245184 65536".to_string(),
        "write -z 1247232 2048".to_string(),
        "write -z -u 1251328 6144".to_string(),
        "discard 1261568 2048".to_string(),
    ];
    let b = standard(extl2(65536, 4), 16 * MIB, &extra);
    assert_has_zero_flag(&b);
    assert_interop("c64k_extl2_r4_subclusters", b);
}

#[test]
fn c64k_r64_prealloc_falloc() {
    let o = Qcow2Opts { preallocation: Some("falloc"), ..opts(65536, 64) };
    assert_interop("c64k_r64_prealloc_falloc", standard(o, 16 * MIB, &[]));
}

#[test]
fn c4k_r16_prealloc_full() {
    let o = Qcow2Opts { preallocation: Some("full"), ..opts(4096, 16) };
    assert_interop("c4k_r16_prealloc_full", standard(o, 4 * MIB, &[]));
}

#[test]
fn c64k_compat010_compressed() {
    let extra = vec![
        "write -c -P 0x51 2097152 65536".to_string(),
        "write -c -s /dev/zero 2162688 65536".to_string(),
        "write -P 0x52 2100000 1000".to_string(),
    ];
    let b = standard(v2(65536), 16 * MIB, &extra);
    assert_has_compressed(&b);
    assert_interop("c64k_compat010_compressed", b);
}

#[test]
fn c64k_extl2_r4_snapshot() {
    let (d, imgdir, elsewhere, scratch) = layout();
    let img = imgdir.join("extsnap.qcow2");
    let pf = pattern_file(&scratch, 6, 65536);
    build_qcow2(&img, &extl2(65536, 4), 8 * MIB, &workload(65536, 8 * MIB, 6, &pf, true));
    qemu_img(["snapshot", "-q", "-c", "s1", &s(&img)]).ok();
    qemu_io_cmds(
        &img,
        "qcow2",
        &["write -P 0x3d 4096 4096".into(), "write -z 65536 2048".into(), "write -P 0x3e 200000 70000".into()],
    );
    assert_snapshots(&img, 1);
    assert_interop("c64k_extl2_r4_snapshot", Built { _dir: d, img: s(&img), cwd: elsewhere, scratch });
}

/// Builds a source image with the standard workload and converts it with
/// `qemu-img convert -c` using `target` options, then runs `after` on the
/// result.
fn compressed_convert(target: Qcow2Opts, size: u64, after: &[String]) -> Built {
    let (d, imgdir, elsewhere, scratch) = layout();
    let src = imgdir.join("src.qcow2");
    let cs = target.cluster_size as u64;
    let pf = pattern_file(&scratch, 7, cs);
    build_qcow2(&src, &Qcow2Opts::cluster(target.cluster_size), size, &workload(cs, size, 7, &pf, false));
    let dst = imgdir.join("compressed.qcow2");
    qemu_img(["convert", "-q", "-c", "-O", "qcow2", "-o", &target.create_options(), &s(&src), &s(&dst)]).ok();
    std::fs::remove_file(&src).unwrap();
    qemu_io_cmds(&dst, "qcow2", after);
    Built { _dir: d, img: s(&dst), cwd: elsewhere, scratch }
}

#[test]
fn c4k_deflate_convert_c() {
    let b = compressed_convert(opts(4096, 16), 8 * MIB, &[]);
    assert_has_compressed(&b);
    assert_interop("c4k_deflate_convert_c", b);
}

#[test]
fn c64k_deflate_convert_c_then_writes() {
    let after = vec![
        // Partial overwrites of compressed clusters.
        "write -P 0x61 100 1000".to_string(),
        "write -z 200000 5000".to_string(),
        "discard 786432 65536".to_string(),
    ];
    let b = compressed_convert(opts(65536, 16), 16 * MIB, &after);
    assert_has_compressed(&b);
    assert_interop("c64k_deflate_convert_c_then_writes", b);
}

#[test]
fn c64k_zstd_extl2_convert_c() {
    let o = Qcow2Opts { compression_type: Some("zstd"), ..extl2(65536, 8) };
    let after = vec!["write -P 0x62 70000 3000".to_string()];
    let b = compressed_convert(o, 16 * MIB, &after);
    assert_has_compressed(&b);
    assert_interop("c64k_zstd_extl2_convert_c", b);
}

#[test]
fn c2m_r16() {
    assert_interop("c2m_r16", standard(opts(2 * MIB as u32, 16), 40 * MIB, &[]));
}

#[test]
fn c2m_extl2_r32() {
    assert_interop("c2m_extl2_r32", standard(extl2(2 * MIB as u32, 32), 40 * MIB, &[]));
}

#[test]
fn c2m_zstd_convert_c() {
    let o = Qcow2Opts { compression_type: Some("zstd"), ..opts(2 * MIB as u32, 2) };
    let b = compressed_convert(o, 40 * MIB, &[]);
    assert_has_compressed(&b);
    assert_interop("c2m_zstd_convert_c", b);
}

// ---------------------------------------------------------------------------
// Backing chains. Created with relative backing names inside `root/chain`;
// the tools run from `root` with the relative image path `chain/top.qcow2`
// (and from `root/elsewhere` with the absolute path), so backing names must be
// resolved relative to the image's directory, not the working directory.

fn chain_layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (d, _img, elsewhere, scratch) = layout();
    let chain = d.path().join("chain");
    std::fs::create_dir_all(&chain).unwrap();
    let _ = elsewhere;
    (d, chain, scratch)
}

fn backed(o: Qcow2Opts, backing: &str, fmt: &str) -> Qcow2Opts {
    Qcow2Opts { backing: Some((backing.to_string(), fmt.to_string())), ..o }
}

fn assert_chain(name: &str, d: tempfile::TempDir, scratch: PathBuf) {
    let root = d.path().to_path_buf();
    let abs = s(&root.join("chain/top.qcow2"));
    assert_max_depth(
        &Built { _dir: tempdir(), img: abs.clone(), cwd: root.join("elsewhere"), scratch: scratch.clone() },
        3,
    );
    let errs_rel =
        verify(&Built { _dir: tempdir(), img: "chain/top.qcow2".into(), cwd: root.clone(), scratch: scratch.clone() });
    let errs_abs = verify(&Built { _dir: tempdir(), img: abs, cwd: root.join("elsewhere"), scratch });
    assert!(
        errs_rel.is_empty() && errs_abs.is_empty(),
        "[{name}] relative-path run: {errs_rel:#?}\nabsolute-path run: {errs_abs:#?}"
    );
    drop(d);
}

#[test]
fn chain_raw_4k_64kextl2_512() {
    let (d, chain, scratch) = chain_layout();
    let size = 8 * MIB;
    // Raw base, fully written (no holes, so its map does not depend on the
    // filesystem's hole reporting).
    let base = chain.join("base.raw");
    let pf = scratch.join("base.bin");
    write_pattern_file(&pf, 10, size as usize);
    build_raw(&base, size, &[format!("write -s {} 0 {size}", s(&pf))]);

    let mid1 = chain.join("mid1.qcow2");
    let pf1 = pattern_file(&scratch, 11, 4096);
    build_qcow2(&mid1, &backed(opts(4096, 16), "base.raw", "raw"), size, &workload(4096, size, 11, &pf1, false));
    let mid2 = chain.join("mid2.qcow2");
    build_qcow2(
        &mid2,
        &backed(extl2(65536, 16), "mid1.qcow2", "qcow2"),
        size,
        &[
            // Subclusters over backing data: the rest of the cluster must
            // still come from mid1/base.
            "write -P 0x81 4096 2048".into(),
            "write -P 0x82 70000 300".into(),
            "write -z 131072 4096".into(),
            "write -z 196608 65536".into(),
            "write -z -u 262144 65536".into(),
            "discard 327680 65536".into(),
            "write -P 0x83 1048000 200000".into(),
        ],
    );
    let top = chain.join("top.qcow2");
    build_qcow2(
        &top,
        &backed(opts(512, 1), "mid2.qcow2", "qcow2"),
        size,
        &[
            "write -P 0x91 0 512".into(),
            "write -P 0x92 5000 100".into(),
            "write -z 1048576 4096".into(),
            "discard 2097152 65536".into(),
            "write -P 0x93 8387584 512".into(),
        ],
    );
    assert_chain("chain_raw_4k_64kextl2_512", d, scratch);
}

#[test]
fn chain_short_raw_v2_2m_16kextl2() {
    let (d, chain, scratch) = chain_layout();
    let size = 8 * MIB;
    // Base shorter than the overlays: reads past its end are zeros.
    let base = chain.join("base.raw");
    let base_size = 3 * MIB + 4096;
    let pf = scratch.join("base.bin");
    write_pattern_file(&pf, 20, base_size as usize);
    build_raw(&base, base_size, &[format!("write -s {} 0 {base_size}", s(&pf))]);

    // compat 0.10: no zero flag, discard leaves holes that show the backing.
    let a = chain.join("a.qcow2");
    build_qcow2(
        &a,
        &backed(v2(65536), "base.raw", "raw"),
        size,
        &[
            "write -P 0xa1 65536 131072".into(),
            "write -z 262144 65536".into(),
            "write -P 0xa2 3000000 300000".into(),
            "discard 65536 65536".into(),
        ],
    );
    let b = chain.join("b.qcow2");
    let bpf = pattern_file(&scratch, 21, 2 * MIB);
    build_qcow2(
        &b,
        &backed(Qcow2Opts { compression_type: Some("zstd"), ..opts(2 * MIB as u32, 4) }, "a.qcow2", "qcow2"),
        size,
        &[format!("write -c -s {} 2097152 2097152", s(&bpf)), "write -P 0xb1 6291456 1000".into()],
    );
    let top = chain.join("top.qcow2");
    build_qcow2(
        &top,
        &backed(Qcow2Opts { lazy_refcounts: true, ..extl2(16384, 16) }, "b.qcow2", "qcow2"),
        size,
        &[
            "write -P 0xc1 1024 1024".into(),
            "write -z 2097152 8192".into(),
            "write -P 0xc2 3145000 2000".into(),
            "discard 6291456 16384".into(),
        ],
    );
    assert_chain("chain_short_raw_v2_2m_16kextl2", d, scratch);
}

// ---------------------------------------------------------------------------
// `quring io` pattern verification.

#[test]
fn io_read_pattern_verification() {
    let (_d, imgdir, elsewhere, _scratch) = layout();
    let img = imgdir.join("io.qcow2");
    build_qcow2(
        &img,
        &opts(4096, 16),
        4 * MIB,
        &["write -P 0x5a 0 65536".into(), "write -P 0xa5 6000 10000".into(), "write -z 32768 4096".into()],
    );
    let img = s(&img);
    // Sanity: qemu-io agrees with the expectations.
    for (cmd, good) in [
        ("read -P 0x5a 0 6000", true),
        ("read -P 0xa5 6000 10000", true),
        ("read -P 0x00 32768 4096", true),
        ("read -P 0x00 1048576 65536", true),
        ("read -P 0x5b 0 4096", false),
        ("read -P 0x5a 4096 4096", false),
    ] {
        let q = qemu_io(["-c", cmd, &img]);
        assert_eq!(q.success(), good, "qemu-io disagrees:\n{}", q.describe());
        let r = quring_in(&elsewhere, ["io", "-c", cmd, &img]);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(!all.contains("panicked") && r.code != Some(101), "{}", r.describe());
        if good {
            assert!(r.success(), "quring io must succeed:\n{}", r.describe());
            assert!(!all.contains("Pattern verification failed"), "{}", r.describe());
        } else {
            assert!(!r.success(), "quring io must fail:\n{}", r.describe());
            assert!(
                all.contains("Pattern verification failed"),
                "quring io must print qemu-io's \"Pattern verification failed\":\n{}",
                r.describe()
            );
        }
    }
    // Several commands in one invocation; one bad read fails the run.
    let r = quring(["io", "-c", "read -P 0x5a 0 4096", "-c", "read -P 0xa5 8192 4096", &img]);
    assert!(r.success(), "{}", r.describe());
    let r = quring([
        "io",
        "-c",
        "read -P 0x5a 0 4096",
        "-c",
        "read -P 0x11 8192 4096",
        "-c",
        "read -P 0xa5 8192 4096",
        &img,
    ]);
    assert!(!r.success(), "{}", r.describe());
    assert!(format!("{}{}", r.stdout, r.stderr).contains("Pattern verification failed"), "{}", r.describe());
}

// ---------------------------------------------------------------------------
// External data files (issue 17, acceptance 3): the cases of the matrix that qcow2 allows
// with a data file (version 3, no compressed clusters, no internal snapshots), repeated
// with `data_file` and with `data_file_raw=on`. With the raw bit the data file itself must
// also equal the disk.

fn with_data_file(o: Qcow2Opts, raw: bool) -> Qcow2Opts {
    Qcow2Opts { data_file: Some(("test.data", raw)), ..o }
}

fn lazy(cs: u32, refcount_bits: u32) -> Qcow2Opts {
    Qcow2Opts { lazy_refcounts: true, ..opts(cs, refcount_bits) }
}

fn prealloc(o: Qcow2Opts, mode: &'static str) -> Qcow2Opts {
    Qcow2Opts { preallocation: Some(mode), ..o }
}

#[track_caller]
fn assert_data_file_interop(name: &str, o: Qcow2Opts, size: u64) {
    for raw in [false, true] {
        let b = standard(with_data_file(o.clone(), raw), size, &[]);
        let tag = format!("{name} data_file{}", if raw { " raw" } else { "" });
        let data = Path::new(&b.img).with_file_name("test.data");
        assert!(data.exists(), "[{tag}] no data file at {}", data.display());
        let raw_check =
            raw.then(|| run_in(&b.cwd, "qemu-img", ["compare", "-f", "qcow2", "-F", "raw", &b.img, &s(&data)]));
        assert_interop(&tag, b);
        if let Some(c) = raw_check {
            assert_eq!(c.code, Some(0), "[{tag}] the raw data file differs from the disk:\n{}", c.describe());
        }
    }
}

#[test]
fn data_file_c512_r16() {
    assert_data_file_interop("c512_r16", opts(512, 16), 2 * MIB);
}

#[test]
fn data_file_c4k_r8_lazy() {
    assert_data_file_interop("c4k_r8_lazy", lazy(4096, 8), 4 * MIB);
}

#[test]
fn data_file_c4k_r32_prealloc_metadata() {
    assert_data_file_interop("c4k_r32_prealloc_metadata", prealloc(opts(4096, 32), "metadata"), 4 * MIB);
}

#[test]
fn data_file_c16k_extl2_r1() {
    assert_data_file_interop("c16k_extl2_r1", extl2(16384, 1), 8 * MIB);
}

#[test]
fn data_file_c64k_r16_default() {
    assert_data_file_interop("c64k_r16_default", opts(65536, 16), 16 * MIB);
}

#[test]
fn data_file_c64k_extl2_r4() {
    assert_data_file_interop("c64k_extl2_r4", extl2(65536, 4), 16 * MIB);
}

#[test]
fn data_file_c64k_r64_prealloc_falloc() {
    assert_data_file_interop("c64k_r64_prealloc_falloc", prealloc(opts(65536, 64), "falloc"), 16 * MIB);
}

#[test]
fn data_file_c4k_r16_prealloc_full() {
    assert_data_file_interop("c4k_r16_prealloc_full", prealloc(opts(4096, 16), "full"), 4 * MIB);
}

#[test]
fn data_file_c2m_r16() {
    assert_data_file_interop("c2m_r16", opts(2 << 20, 16), 64 * MIB);
}

#[test]
fn data_file_c2m_extl2_r32() {
    assert_data_file_interop("c2m_extl2_r32", extl2(2 << 20, 32), 64 * MIB);
}

#[test]
fn data_file_c4k_r8_lazy_dirty() {
    // As c4k_r8_lazy_dirty: qemu-io abort()s with lazy refcounts.
    for raw in [false, true] {
        let (d, imgdir, elsewhere, scratch) = layout();
        let img = imgdir.join("dirty.qcow2");
        let o = with_data_file(Qcow2Opts { lazy_refcounts: true, ..opts(4096, 8) }, raw);
        create_qcow2(&img, &o, 4 * MIB);
        let pf = pattern_file(&scratch, 4, 4096);
        let mut args = vec!["-f".to_string(), "qcow2".into()];
        for c in workload(4096, 4 * MIB, 4, &pf, false) {
            args.extend(["-c".into(), c]);
        }
        args.extend(["-c".into(), "abort".into(), s(&img)]);
        let r = run_in(&scratch, "qemu-io", &args);
        assert_eq!(r.signal, Some(libc::SIGABRT), "{}", r.describe());
        // (QEMU 10 leaves no dirty bit here: with a data file the data clusters have no
        // refcounts to defer, so the flag is not asserted; the abort still leaves the image
        // as an interrupted lazy-refcount session does.)
        assert_interop(
            &format!("c4k_r8_lazy_dirty data_file raw={raw}"),
            Built { _dir: d, img: s(&img), cwd: elsewhere, scratch },
        );
    }
}

#[test]
fn data_file_overlay_on_raw_backing() {
    // A data-file overlay (raw off: QEMU forbids the raw bit with a backing file) over a
    // shorter raw backing file: copy-on-write fills come from the backing file.
    let (d, imgdir, elsewhere, scratch) = layout();
    let base = imgdir.join("base.raw");
    build_raw(&base, 3 * MIB, &["write -P 0x11 0 3M".into()]);
    let img = imgdir.join("top.qcow2");
    let o =
        Qcow2Opts { backing: Some((s(&base), "raw".into())), data_file: Some(("top.data", false)), ..opts(65536, 16) };
    let pf = pattern_file(&scratch, 9, 65536);
    build_qcow2(&img, &o, 4 * MIB, &workload(65536, 4 * MIB, 9, &pf, false));
    assert_interop("data_file_overlay_on_raw_backing", Built { _dir: d, img: s(&img), cwd: elsewhere, scratch });
}
