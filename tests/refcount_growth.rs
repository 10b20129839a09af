//! Refcount structure growth: images written by `quring io` well past what
//! their first refcount block covers (and, for 512 B clusters with 64-bit
//! refcounts, past what a one-cluster refcount table covers, so the table
//! must move). The same commands applied by qemu-io to a copy must give an
//! identical image (`qemu-img compare`), and `qemu-img check` must pass.
//!
//! Coverage of one refcount block: cluster_size * 8 / refcount_bits clusters.
//! - 512 B, 64-bit: 64 clusters (32 KiB) per block; a one-cluster table holds
//!   64 blocks = 2 MiB of host clusters.
//! - 512 B, 1-bit: 4096 clusters (2 MiB) per block.
//! - 64 KiB, 64-bit: 8192 clusters (512 MiB) per block.
//! - 64 KiB, 1-bit: 524288 clusters (32 GiB) per block: out of reach for a
//!   test; that case only spreads writes over many L2 tables.

mod common;

use common::*;
use std::path::Path;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn run_cmds(tool: &str, img: &Path, cmds: &[String], per_process: usize) {
    for ch in cmds.chunks(per_process) {
        let mut args = Vec::new();
        if tool == "quring" {
            args.push("io".to_string());
        }
        args.extend(["-f".to_string(), "qcow2".into()]);
        for c in ch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(s(img));
        let r = if tool == "quring" {
            quring_with_timeout(&args, std::time::Duration::from_secs(30))
        } else {
            qemu_io(&args)
        };
        assert!(
            r.success() && !r.stdout.contains("failed") && !r.stderr.contains("failed"),
            "{tool} failed:\n{}",
            r.describe()
        );
    }
}

/// Creates the image, applies `cmds` with quring and qemu-io to two copies,
/// and checks both the quring image's consistency and equality.
fn growth_case(name: &str, cluster: u32, refcount_bits: u32, virt: u64, cmds: Vec<String>, per_process: usize) {
    let d = tempdir();
    let a = d.path().join("quring.qcow2");
    let b = d.path().join("qemu.qcow2");
    let opts = Qcow2Opts { cluster_size: cluster, refcount_bits, ..Default::default() };
    create_qcow2(&a, &opts, virt);
    std::fs::copy(&a, &b).unwrap();
    let rt_off = read_be64(&a, 48);
    run_cmds("quring", &a, &cmds, per_process);
    run_cmds("qemu-io", &b, &cmds, per_process);
    let ctx = format!(
        "case {name}: qemu-img create -f qcow2 -o {} IMG {virt}; then {} commands (first: {:?}, last: {:?})",
        opts.create_options(),
        cmds.len(),
        cmds.first(),
        cmds.last()
    );
    let check = qemu_img(["check", &s(&a)]);
    let mut errors = Vec::new();
    if !check.success() {
        errors.push(format!("qemu-img check on the quring-written image failed:\n{}", check.describe()));
    }
    let cmp = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &s(&a), &s(&b)]);
    if !cmp.success() {
        errors.push(format!("qemu-img compare: quring and qemu-io images differ:\n{}", cmp.describe()));
    }
    let ours = quring(["check", &s(&a)]);
    if ours.code != check.code {
        errors.push(format!("quring check exit {:?} != qemu-img check exit {:?}", ours.code, check.code));
    }
    // The refcount table did (or did not) move as qemu's would have.
    eprintln!(
        "{name}: refcount table {rt_off:#x} -> {:#x} ({} clusters), file {} bytes (qemu-io copy: table {:#x}, {} bytes)",
        read_be64(&a, 48),
        read_be32(&a, 56),
        file_len(&a),
        read_be64(&b, 48),
        file_len(&b)
    );
    assert!(errors.is_empty(), "{ctx}\n{}", errors.join("\n"));
}

/// `n` writes of `len` bytes at `stride` apart starting at `start`, with
/// varying patterns.
fn strided(start: u64, stride: u64, len: u64, n: u64, pat0: usize) -> Vec<String> {
    (0..n).map(|i| format!("write -P 0x{:02x} {} {len}", pattern_byte(pat0 + i as usize), start + i * stride)).collect()
}

#[test]
fn c512_rb64_block_and_table_growth() {
    // 6 MiB contiguous (12288 data clusters = 192 refcount blocks: the
    // one-cluster table of 64 entries must grow) plus scattered small writes
    // that each need a new L2 table.
    let mut cmds = strided(0, MIB, MIB, 6, 0);
    cmds.extend(strided(8 * MIB + 1000, 96 * KIB, 700, 150, 10));
    // Overwrites of existing clusters, unaligned.
    cmds.extend(strided(100_000, 700 * KIB, 3000, 8, 40));
    growth_case("512/rb64", 512, 64, 32 * MIB, cmds, 80);
}

#[test]
fn c512_rb64_table_growth_many_processes() {
    // The same growth, one quring process per few commands (the grown
    // structures must be found again on reopen).
    let cmds = strided(0, 512 * KIB, 256 * KIB, 16, 60);
    growth_case("512/rb64 reopen", 512, 64, 16 * MIB, cmds, 2);
}

#[test]
fn c512_rb1_block_growth() {
    // 1-bit refcounts: a block covers 2 MiB of host clusters; write ~7 MiB.
    let mut cmds = strided(0, 2 * MIB, 1536 * KIB, 4, 80);
    cmds.extend(strided(9 * MIB + 7, 64 * KIB, 5000, 16, 90));
    growth_case("512/rb1", 512, 1, 16 * MIB, cmds, 40);
}

#[test]
fn c64k_rb64_block_growth() {
    // A 64-bit block of a 64 KiB cluster covers 8192 clusters (512 MiB):
    // allocate ~8400 clusters with one sector each (files stay sparse).
    let n = 8400;
    let cmds = strided(0, 64 * KIB, 512, n, 120);
    growth_case("64K/rb64", 65536, 64, n * 64 * KIB + 64 * MIB, cmds, 3000);
}

#[test]
fn c64k_rb1_spread() {
    // 1-bit blocks of 64 KiB clusters cover 32 GiB: out of reach; spread
    // writes over a 4 GiB disk (many L2 tables) instead.
    let cmds = strided(12345, 37 * MIB + 4096, 70 * KIB, 110, 200);
    growth_case("64K/rb1", 65536, 1, 4096 * MIB, cmds, 200);
}
