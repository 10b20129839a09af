//! Differential write test (acceptance of the write path): seeded random
//! sequences of `write -P`, `write -z`, `write -z -u`, `discard` and `flush`
//! are applied by `quring io` and by `qemu-io` to copies of the same starting
//! image. Afterwards `qemu-img compare` must find both identical, `qemu-img
//! check` must pass on the quring-written image, and `quring check` must exit
//! like `qemu-img check`.
//!
//! The matrix (cluster size, refcount width, extended L2, lazy refcounts,
//! compat, backing chain, internal snapshot, one process vs. reopening) is
//! covered by a representative subset of cases, each with its own seed.
//!
//! Set `QURING_MINIMIZE=1` to shrink a failing command list greedily before
//! reporting it (slow; for writing bug reports).

mod common;

use common::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// No backing file.
    None,
    /// raw base <- qcow2 middle (with data) <- image under test.
    RawBase,
    /// qcow2 base <- qcow2 middle (with data) <- image under test.
    Qcow2Base,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Snap {
    None,
    /// `qemu-img snapshot -c` as the last step before the sequence.
    Plain,
    /// `qemu-img snapshot -c`, then more qemu-io writes (the snapshot table is
    /// no longer at the end of the file).
    ThenWrites,
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    lazy: bool,
    compat: Compat,
    chain: Chain,
    snap: Snap,
    /// Largest chunk of commands one `quring io` process runs; 1-3 means the
    /// image is reopened between (almost) every step.
    max_chunk: usize,
    virt: u64,
    ncmds: usize,
    /// Longest request.
    max_len: u64,
}

impl Case {
    fn new(seed: u64, cluster: u64, refcount_bits: u32) -> Case {
        Case {
            seed,
            cluster,
            refcount_bits,
            extended_l2: false,
            lazy: false,
            compat: Compat::V11,
            chain: Chain::None,
            snap: Snap::None,
            max_chunk: 25,
            virt: 16 * MIB,
            ncmds: 48,
            max_len: 4 * MIB,
        }
    }

    fn opts(&self) -> Qcow2Opts {
        Qcow2Opts {
            cluster_size: self.cluster as u32,
            refcount_bits: self.refcount_bits,
            extended_l2: self.extended_l2,
            compat: self.compat,
            lazy_refcounts: self.lazy,
            ..Default::default()
        }
    }

    fn subcluster(&self) -> u64 {
        if self.extended_l2 { self.cluster / 32 } else { self.cluster }
    }
}

/// Picks an offset of the given alignment class inside `0..virt`.
fn pick_offset(rng: &mut Rng, c: &Case, allow_bytes: bool) -> u64 {
    let v = c.virt;
    let cs = c.cluster;
    // A hot zone so that requests overlap often.
    let zone = if rng.percent(40) { (4 * cs).max(MIB).min(v) } else { v };
    let raw = rng.below(zone);
    let class = rng.below(if allow_bytes { 6 } else { 5 });
    let off = match class {
        0 => raw / cs * cs,
        1 => raw / c.subcluster() * c.subcluster(),
        2 => raw / 512 * 512,
        // Just before a cluster boundary.
        3 => (raw / cs * cs + cs).saturating_sub(512 * rng.range(1, 3)),
        4 => raw / 4096 * 4096,
        _ => raw,
    };
    off.min(v - 1)
}

/// Picks a length in 512 B..max_len of some alignment class.
fn pick_len(rng: &mut Rng, c: &Case, allow_bytes: bool) -> u64 {
    let cs = c.cluster;
    let sc = c.subcluster();
    let len = match rng.below(if allow_bytes { 6 } else { 5 }) {
        0 => 512 * rng.range(1, 8),
        1 => sc * rng.range(1, 3),
        2 => cs * rng.range(1, 3),
        3 => rng.range(1, c.max_len / 512) * 512,
        4 => (cs * rng.range(1, 2)).saturating_sub(512).max(512),
        _ => rng.range(512, (2 * cs).clamp(4096, c.max_len)),
    };
    len.clamp(512, c.max_len)
}

/// One random command sequence. `pat0` offsets the pattern bytes so that
/// prefill and sequence patterns differ.
fn gen_cmds(rng: &mut Rng, c: &Case, n: usize, pat0: usize, with_flush: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = rng.below(100);
        let cmd = if r < 45 {
            let off = pick_offset(rng, c, true);
            let len = pick_len(rng, c, true).min(c.virt - off);
            format!("write -P 0x{:02x} {off} {len}", pattern_byte(pat0 + i))
        } else if r < 60 {
            let bytes = rng.percent(20);
            let off = pick_offset(rng, c, bytes);
            let len = pick_len(rng, c, false).min(c.virt - off);
            format!("write -z {off} {len}")
        } else if r < 72 {
            let off = pick_offset(rng, c, false);
            let len = pick_len(rng, c, false).min(c.virt - off);
            format!("write -z -u {off} {len}")
        } else if r < 92 || !with_flush {
            let off = pick_offset(rng, c, false);
            let len = pick_len(rng, c, false).min(c.virt - off);
            format!("discard {off} {len}")
        } else {
            "flush".to_string()
        };
        out.push(cmd);
    }
    out
}

/// Splits `cmds` into chunks of 1..=max sizes.
fn chunks(rng: &mut Rng, cmds: &[String], max: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cmds.len() {
        let n = (rng.range(1, max as u64) as usize).min(cmds.len() - i);
        out.push(cmds[i..i + n].to_vec());
        i += n;
    }
    out
}

/// Files of one case.
struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    /// The starting image (never modified after setup).
    start: PathBuf,
    /// Copy of the starting image for `qemu-img snapshot -a` checks.
    snap_name: Option<&'static str>,
    desc: String,
}

fn describe(c: &Case) -> String {
    format!(
        "seed={} cluster_size={} refcount_bits={} extended_l2={} lazy_refcounts={} compat={} chain={:?} snapshot={:?} \
         max_chunk={} virtual={} (qemu-img create -o {})",
        c.seed,
        c.cluster,
        c.refcount_bits,
        c.extended_l2,
        c.lazy,
        c.compat.as_str(),
        c.chain,
        c.snap,
        c.max_chunk,
        c.virt,
        c.opts().create_options()
    )
}

/// Creates the starting image (and its backing chain) for `c`, in a fresh
/// directory. The image holds data written by qemu-io.
fn setup(c: &Case, rng: &mut Rng) -> Setup {
    let d = tempdir();
    let dir = d.path().to_path_buf();
    let start = dir.join("start.qcow2");
    let mut desc = describe(c);
    let mut opts = c.opts();
    match c.chain {
        Chain::None => {}
        Chain::RawBase | Chain::Qcow2Base => {
            let base = if c.chain == Chain::RawBase { "base.raw" } else { "base.qcow2" };
            let bpath = dir.join(base);
            let base_cmds =
                gen_cmds(rng, c, 10, 100, false).into_iter().filter(|s| s.starts_with("write -P")).collect::<Vec<_>>();
            if c.chain == Chain::RawBase {
                build_raw(&bpath, c.virt, &base_cmds);
            } else {
                build_qcow2(&bpath, &Qcow2Opts::cluster(65536), c.virt, &base_cmds);
            }
            let bfmt = if c.chain == Chain::RawBase { "raw" } else { "qcow2" };
            let mid_opts = Qcow2Opts { backing: Some((base.into(), bfmt.into())), ..c.opts() };
            let mid_cmds = gen_cmds(rng, c, 10, 150, false);
            build_qcow2(&dir.join("mid.qcow2"), &mid_opts, c.virt, &mid_cmds);
            opts.backing = Some(("mid.qcow2".into(), "qcow2".into()));
            let _ = write!(desc, "\n  base {base} cmds: {base_cmds:?}\n  mid.qcow2 cmds: {mid_cmds:?}");
        }
    }
    let pre = gen_cmds(rng, c, 12, 200, false);
    build_qcow2(&start, &opts, c.virt, &pre);
    let _ = write!(desc, "\n  start image prefill (qemu-io): {pre:?}");
    let snap_name = match c.snap {
        Snap::None => None,
        Snap::Plain | Snap::ThenWrites => {
            qemu_img(["snapshot", "-c", "snap1", &s(&start)]).ok();
            let _ = write!(desc, "\n  then: qemu-img snapshot -c snap1");
            if c.snap == Snap::ThenWrites {
                let post = gen_cmds(rng, c, 6, 250, false);
                qemu_io_cmds(&start, "qcow2", &post);
                let _ = write!(desc, "\n  then (qemu-io): {post:?}");
            }
            Some("snap1")
        }
    };
    Setup { _dir: d, dir, start, snap_name, desc }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

/// Runs `cmds` with quring, one process per chunk.
fn quring_chunks(img: &Path, chunks: &[Vec<String>]) -> Result<(), String> {
    for ch in chunks {
        let mut args = vec!["io".to_string(), "-f".into(), "qcow2".into()];
        for c in ch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(s(img));
        let r = quring_with_timeout(&args, std::time::Duration::from_secs(20));
        if !r.success() || r.stdout.contains("failed") || !r.stderr.trim().is_empty() {
            return Err(format!("quring io failed:\n{}", r.describe()));
        }
    }
    Ok(())
}

fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let r = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &s(a), &s(b)]);
    if r.code != Some(0) {
        return Err(format!("qemu-img compare: images differ:\n{}", r.describe()));
    }
    Ok(())
}

fn checks(img: &Path) -> Result<(), String> {
    let q = qemu_img(["check", &s(img)]);
    let mut err = String::new();
    if q.code != Some(0) {
        let _ = writeln!(err, "qemu-img check on the quring-written image failed:\n{}", q.describe());
    }
    let ours = quring(["check", &s(img)]);
    if ours.code != q.code {
        let _ = writeln!(
            err,
            "quring check exit {:?} != qemu-img check exit {:?}:\n{}",
            ours.code,
            q.code,
            ours.describe()
        );
    }
    if err.is_empty() { Ok(()) } else { Err(err) }
}

/// Applies the sequence to fresh copies of the starting image and checks the
/// outcome. Returns a description of the first problem.
fn attempt(st: &Setup, cmds: &[String], chunked: &[Vec<String>], tag: &str) -> Result<(), String> {
    let a = st.dir.join(format!("quring{tag}.qcow2"));
    let b = st.dir.join(format!("qemu{tag}.qcow2"));
    copy(&st.start, &a);
    copy(&st.start, &b);
    let res = (|| {
        quring_chunks(&a, chunked)?;
        qemu_io_cmds(&b, "qcow2", cmds);
        compare(&a, &b)?;
        checks(&a)?;
        if let Some(name) = st.snap_name {
            // Reverting must give the snapshot's content on both copies.
            let reference = st.dir.join(format!("ref{tag}.qcow2"));
            copy(&st.start, &reference);
            qemu_img(["snapshot", "-a", name, &s(&reference)]).ok();
            for img in [&a, &b] {
                let r = qemu_img(["snapshot", "-a", name, &s(img)]);
                if !r.success() {
                    return Err(format!("qemu-img snapshot -a failed:\n{}", r.describe()));
                }
                compare(img, &reference).map_err(|e| format!("after snapshot -a on {}: {e}", img.display()))?;
            }
            checks(&a).map_err(|e| format!("after snapshot -a: {e}"))?;
        }
        Ok(())
    })();
    if res.is_ok() {
        for p in [&a, &b] {
            let _ = std::fs::remove_file(p);
        }
    }
    res
}

/// Greedy shrinking: drop single commands while the failure persists (runs
/// everything in one quring process).
fn minimize(st: &Setup, cmds: &[String]) -> Vec<String> {
    let mut cur = cmds.to_vec();
    let mut i = 0;
    let mut n = 0;
    while i < cur.len() {
        let mut t = cur.clone();
        t.remove(i);
        n += 1;
        if !t.is_empty() && attempt(st, &t, std::slice::from_ref(&t), &format!("-min{n}")).is_err() {
            cur = t;
        } else {
            i += 1;
        }
    }
    cur
}

fn run_case(c: Case) {
    let mut rng = Rng(c.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1ff);
    let st = setup(&c, &mut rng);
    let cmds = gen_cmds(&mut rng, &c, c.ncmds, 0, true);
    let chunked = chunks(&mut rng, &cmds, c.max_chunk);
    if let Err(e) = attempt(&st, &cmds, &chunked, "") {
        let mut msg = format!("differential write failure\n  case: {}\n  {e}\n  commands ({}):\n", st.desc, cmds.len());
        for (i, ch) in chunked.iter().enumerate() {
            let _ = writeln!(msg, "    quring process {i}: {ch:?}");
        }
        if std::env::var_os("QURING_MINIMIZE").is_some() {
            let m = minimize(&st, &cmds);
            let _ = writeln!(msg, "  minimized (one process): {m:?}");
            if let Err(e) = attempt(&st, &m, std::slice::from_ref(&m), "-final") {
                let _ = writeln!(msg, "  minimized failure: {e}");
            }
        }
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------
// The matrix. Every value of every axis appears at least once:
// cluster 512/4K/64K/2M; refcount_bits 1..64; extended_l2 on/off; lazy on/off;
// compat 0.10/1.1; chain none/raw base/qcow2 base; snapshot; one process /
// reopen between steps.

#[test]
fn c64k_rb16_plain() {
    run_case(Case::new(1, 64 * KIB, 16));
}

#[test]
fn c64k_rb1_extl2_lazy() {
    run_case(Case { extended_l2: true, lazy: true, ..Case::new(2, 64 * KIB, 1) });
}

#[test]
fn c4k_rb2_rawchain() {
    run_case(Case { chain: Chain::RawBase, virt: 8 * MIB, ..Case::new(3, 4 * KIB, 2) });
}

#[test]
fn c4k_rb4_reopen() {
    run_case(Case { max_chunk: 3, virt: 8 * MIB, ncmds: 30, ..Case::new(4, 4 * KIB, 4) });
}

#[test]
fn c2m_rb8_extl2_qcow2chain() {
    run_case(Case { extended_l2: true, chain: Chain::Qcow2Base, virt: 32 * MIB, ..Case::new(5, 2 * MIB, 8) });
}

#[test]
fn c2m_rb32_lazy() {
    run_case(Case { lazy: true, virt: 32 * MIB, ..Case::new(6, 2 * MIB, 32) });
}

#[test]
fn c512_rb64() {
    run_case(Case { virt: 4 * MIB, max_len: MIB, ncmds: 32, ..Case::new(7, 512, 64) });
}

#[test]
fn c512_rb16_compat010_reopen() {
    run_case(Case {
        compat: Compat::V010,
        virt: 4 * MIB,
        max_len: MIB,
        ncmds: 24,
        max_chunk: 2,
        ..Case::new(8, 512, 16)
    });
}

#[test]
fn c64k_compat010_rawchain() {
    run_case(Case { compat: Compat::V010, chain: Chain::RawBase, ..Case::new(9, 64 * KIB, 16) });
}

#[test]
fn c32k_rb16_extl2_qcow2chain_reopen() {
    run_case(Case {
        extended_l2: true,
        chain: Chain::Qcow2Base,
        max_chunk: 3,
        ncmds: 30,
        ..Case::new(10, 32 * KIB, 16)
    });
}

#[test]
fn c64k_rb64_snapshot() {
    run_case(Case { snap: Snap::Plain, ..Case::new(11, 64 * KIB, 64) });
}

#[test]
fn c64k_rb8_extl2_snapshot_then_writes() {
    run_case(Case { extended_l2: true, snap: Snap::ThenWrites, ..Case::new(12, 64 * KIB, 8) });
}

#[test]
fn c4k_rb16_lazy_snapshot_then_writes_reopen() {
    run_case(Case { lazy: true, snap: Snap::ThenWrites, max_chunk: 4, virt: 8 * MIB, ..Case::new(13, 4 * KIB, 16) });
}

#[test]
fn c2m_rb4_snapshot_then_writes_rawchain() {
    run_case(Case { snap: Snap::ThenWrites, chain: Chain::RawBase, virt: 32 * MIB, ..Case::new(14, 2 * MIB, 4) });
}

#[test]
fn c64k_rb2_extl2_many() {
    run_case(Case { extended_l2: true, ncmds: 96, ..Case::new(15, 64 * KIB, 2) });
}
