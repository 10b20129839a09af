//! Crash consistency with real processes: fio writes through the quring plugin and is
//! killed with SIGKILL at a random point of its I/O stream. Afterwards the image must pass
//! `qemu-img check`, and every write the engine had promised to keep must read back intact,
//! verified by fio itself.
//!
//! What was promised is read from the plugin's completion journal (`QURING_FIO_ACK_LOG`,
//! see `fio-plugin/src/lib.rs`): one line per write completion, flush submission and
//! flush completion, each appended with one write(2) before fio hears of it, so the journal
//! survives the kill and its order is the real order. A write whose completion precedes
//! the submission of a flush that completed is promised (with cache=writethrough, every
//! completed write is); after a clean close, every completed write is. fio's own verify
//! state (`verify_state_save`) cannot serve: fio writes it only when it exits or when a
//! trigger fires, never on SIGKILL, and it records completions, not flushes.
//!
//! A SIGKILL is not a power cut: every write the process had submitted still reaches the
//! file. What it tests is the engine's real process and plugin path: that metadata is
//! submitted in an order where any prefix is consistent, that a completed flush covers
//! every write completed before it (on any queue), and that nothing reachable is garbage.
//! Lost device writes and torn writes are the recorded-crash harness's job (`crash.rs`).
//!
//! One kill state, step by step:
//! 1. `quring create` an empty image with the variant's options; fio `rw=randwrite`,
//!    `bsrange=4k-64k` (or sequential 4 KiB writes at QD32), `verify=crc32c`, `verify_interval=4k` (every 4 KiB unit carries its
//!    own header with its offset and a checksum), fio's random map on (each unit is written
//!    at most once: the journal is checked for that), `fsync=N`, `thread=1`.
//! 2. SIGKILL once the journal holds a number of write completions drawn from the seed
//!    (sometimes more than fio writes: then fio finishes and the image is closed cleanly).
//! 3. Lazy refcounts: `quring io -c flush` first (quring's repair open of a dirty image).
//!    `qemu-img check` must exit 0 or 3 (leaks are allowed after a crash), 0 after the
//!    repair for lazy refcounts; `quring check` must give the same verdict.
//! 4. `qemu-img convert -O raw` and `quring convert -O raw` must be byte-identical.
//! 5. fio (psync on the raw file, replaying a read iolog, `verify=crc32c`) verifies every
//!    promised unit plus every non-zero unit anywhere in the disk: a promised unit must hold
//!    its fio block, and any other data must be a complete fio block for its own offset (no
//!    garbage, nothing misplaced). The one exception: with clusters smaller than a unit, a
//!    write in flight at the kill may be torn at cluster granularity (some of its clusters
//!    mapped, others still zero), which is allowed for a write never promised; such units
//!    are counted, not verified.
//!
//! Environment:
//! - `QURING_SIGKILL_KILLS=N`: kill states to check (default 36, 3 per variant).
//! - `QURING_SIGKILL_SEED=S`: first seed (default: from the clock, printed). Kill `k` uses
//!   seed `S + k`; the seed picks the variant, fio's `randseed` and the kill point.
//!   Reproduce a failure with `QURING_SIGKILL_SEED=<seed> QURING_SIGKILL_KILLS=1`.
//! - `QURING_SIGKILL_KEEP_GOING=1`: report every violation instead of stopping at the first.
//! - `QURING_SIGKILL_VERBOSE=1`: one line per kill state.
//! - `QURING_FIO=PATH`: the plugin to test (default: target/debug, else target/release).

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Variant {
    name: &'static str,
    /// `quring create -o` options.
    create: &'static str,
    writethrough: bool,
    numjobs: u64,
    iodepth: u32,
    /// fio `fsync=N` (0: no flushes; only a clean close promises anything).
    fsync: u32,
    size_per_job: u64,
    /// fio `rw`: `randwrite`, or `write` (sequential: many writes in flight to the same
    /// new cluster).
    rw: &'static str,
    /// fio `bsrange` (`bs` when a single size).
    bs: &'static str,
    /// Bytes per write on average (for the kill points): about 25 KiB for `4k-64k` (the
    /// random map shortens writes that run into written units; 2676 writes for 64 MiB).
    avg_write: u64,
}

const STD: Variant = Variant {
    name: "",
    create: "cluster_size=64k",
    writethrough: false,
    numjobs: 1,
    iodepth: 16,
    fsync: 16,
    size_per_job: 64 * MIB,
    rw: "randwrite",
    bs: "4k-64k",
    avg_write: 25 * 1024,
};

const SEQ: Variant =
    Variant { rw: "write", bs: "4k", avg_write: 4096, iodepth: 32, fsync: 64, size_per_job: 32 * MIB, ..STD };

const VARIANTS: &[Variant] = &[
    Variant { name: "64k", ..STD },
    Variant { name: "64k extended_l2", create: "cluster_size=64k,extended_l2=on", fsync: 8, ..STD },
    Variant { name: "64k refcount_bits=1", create: "cluster_size=64k,refcount_bits=1", ..STD },
    Variant { name: "64k lazy_refcounts", create: "cluster_size=64k,lazy_refcounts=on", ..STD },
    Variant { name: "64k writethrough", writethrough: true, iodepth: 8, fsync: 0, ..STD },
    Variant { name: "64k numjobs=2", numjobs: 2, iodepth: 8, fsync: 8, size_per_job: 32 * MIB, ..STD },
    Variant { name: "4k clusters", create: "cluster_size=4k", fsync: 32, ..STD },
    Variant { name: "64k no fsync", iodepth: 32, fsync: 0, ..STD },
    Variant {
        name: "512-byte clusters refcount_bits=64 (tables grow)",
        create: "cluster_size=512,refcount_bits=64",
        fsync: 32,
        size_per_job: 8 * MIB,
        avg_write: 22 * 1024,
        ..STD
    },
    Variant { name: "64k writes up to 256k QD64", iodepth: 64, bs: "4k-256k", avg_write: 80 * 1024, ..STD },
    Variant { name: "64k sequential 4k QD32", ..SEQ },
    Variant { name: "64k extended_l2 sequential 4k QD32", create: "cluster_size=64k,extended_l2=on", fsync: 32, ..SEQ },
    // External data files (issue 17): `@DATA` becomes the data file's path in the work dir.
    Variant { name: "64k data_file", create: "cluster_size=64k,data_file=@DATA", ..STD },
    Variant {
        name: "64k extended_l2 data_file_raw",
        create: "cluster_size=64k,extended_l2=on,data_file=@DATA,data_file_raw=on",
        fsync: 8,
        ..STD
    },
];

impl Variant {
    fn lazy(&self) -> bool {
        self.create.contains("lazy_refcounts=on")
    }
    /// The image's cluster size (from `create`; 64 KiB when not given).
    fn cluster_bytes(&self) -> u64 {
        self.create.split(',').find_map(|o| o.strip_prefix("cluster_size=")).map_or(65536, |v| {
            match v.strip_suffix('k') {
                Some(k) => k.parse::<u64>().expect("cluster_size") * 1024,
                None => match v.strip_suffix('M') {
                    Some(m) => m.parse::<u64>().expect("cluster_size") << 20,
                    None => v.parse().expect("cluster_size"),
                },
            }
        })
    }
    fn disk_size(&self) -> u64 {
        self.size_per_job * self.numjobs
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// The journal

/// What the plugin's completion journal says.
#[derive(Debug, Default)]
struct Journal {
    /// Completed writes (offset, length), in completion order.
    writes: Vec<(u64, u64)>,
    /// `writes[..promised]` must be durable.
    promised: usize,
    flushes: usize,
    /// The image was closed cleanly.
    closed: bool,
}

impl Journal {
    fn parse(text: &str, writethrough: bool, disk: u64) -> Result<Journal, String> {
        let mut j = Journal::default();
        // Flush id -> completed writes when it was submitted.
        let mut submitted: HashMap<&str, usize> = HashMap::new();
        // Each record is one write(2) ending in '\n'; anything after the last '\n' would
        // be a torn record (never seen, ignored).
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for (n, line) in complete.lines().enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("journal line {}: {line:?}", n + 1);
            match f.as_slice() {
                ["W", off, len, res] => {
                    let (off, len): (u64, u64) = (off.parse().map_err(|_| bad())?, len.parse().map_err(|_| bad())?);
                    if *res != "0" {
                        return Err(format!("a write failed without injected errors: {}", bad()));
                    }
                    if off % UNIT != 0 || len % UNIT != 0 || len == 0 || off + len > disk {
                        return Err(format!("write outside the 4 KiB grid or the disk: {}", bad()));
                    }
                    j.writes.push((off, len));
                }
                ["S", id] => {
                    submitted.insert(id, j.writes.len());
                }
                ["F", id, res] => {
                    if *res != "0" {
                        return Err(format!("a flush failed without injected errors: {}", bad()));
                    }
                    let covered = submitted
                        .remove(id)
                        .ok_or_else(|| format!("flush completion without submission: {}", bad()))?;
                    j.promised = j.promised.max(covered);
                    j.flushes += 1;
                }
                ["C"] => j.closed = true,
                _ => return Err(format!("unknown record: {}", bad())),
            }
        }
        if writethrough || j.closed {
            j.promised = j.writes.len();
        }
        Ok(j)
    }

    /// Units (4 KiB indexes) of the promised writes; errors if any unit was written twice
    /// (the check relies on fio's random map writing each unit at most once).
    fn promised_units(&self) -> Result<BTreeSet<u64>, String> {
        let mut all = BTreeSet::new();
        for &(off, len) in &self.writes {
            for u in off / UNIT..(off + len) / UNIT {
                if !all.insert(u) {
                    return Err(format!("unit {:#x} written twice: fio's random map did not hold", u * UNIT));
                }
            }
        }
        Ok(self.writes[..self.promised].iter().flat_map(|&(off, len)| off / UNIT..(off + len) / UNIT).collect())
    }
}

// ---------------------------------------------------------------------------------------
// One kill

/// A killed (or finished) fio run's leftovers.
struct KillState {
    variant: Variant,
    img: PathBuf,
    journal: Journal,
    /// SIGKILL hit fio (false: fio finished first).
    killed: bool,
    /// Write completions the kill waited for.
    target: u64,
}

fn write_job_args(v: &Variant, img: &Path, seed: u64) -> Vec<String> {
    let mut a = vec![
        "--name=sigkill".to_string(),
        format!("--ioengine=external:{}", fio_plugin().display()),
        "--thread".into(),
        format!("--filename={}", img.display()),
        format!("--rw={}", v.rw),
        format!("--{}={}", if v.bs.contains('-') { "bsrange" } else { "bs" }, v.bs),
        format!("--iodepth={}", v.iodepth),
        format!("--size={}", v.size_per_job),
        "--verify=crc32c".into(),
        "--verify_interval=4k".into(),
        "--do_verify=0".into(),
        "--verify_state_save=0".into(),
        format!("--randseed={seed}"),
        format!("--cache={}", if v.writethrough { "writethrough" } else { "writeback" }),
    ];
    if v.fsync > 0 {
        a.push(format!("--fsync={}", v.fsync));
    }
    if v.numjobs > 1 {
        a.push(format!("--numjobs={}", v.numjobs));
        a.push(format!("--offset_increment={}", v.size_per_job));
    }
    a
}

/// Counts journal lines starting with `W` as they appear.
struct Tail {
    file: Option<File>,
    at_line_start: bool,
    writes: u64,
}

impl Tail {
    fn poll(&mut self, path: &Path) {
        if self.file.is_none() {
            self.file = File::open(path).ok();
        }
        let Some(f) = self.file.as_mut() else { return };
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = f.read(&mut buf) {
            for &b in &buf[..n] {
                if self.at_line_start && b == b'W' {
                    self.writes += 1;
                }
                self.at_line_start = b == b'\n';
            }
        }
    }
}

/// Creates the image, runs fio and kills it after a seeded number of write completions.
fn kill_once(dir: &Path, seed: u64, v: &Variant, target: u64) -> Result<KillState, String> {
    let img = dir.join("disk.qcow2");
    let ack = dir.join("ack.log");
    let _ = std::fs::remove_file(&ack);
    let create = v.create.replace("@DATA", &s(&dir.join("disk.data")));
    let r = quring(["create", "-q", "-o", &create, &s(&img), &v.disk_size().to_string()]);
    if r.status() != 0 {
        return Err(format!("quring create failed:\n{}", r.describe()));
    }
    let args = write_job_args(v, &img, seed);
    let out = File::create(dir.join("fio-write.out")).unwrap();
    let err = File::create(dir.join("fio-write.err")).unwrap();
    let mut cmd = Command::new("fio");
    cmd.args(&args).current_dir(dir).env("QURING_FIO_ACK_LOG", &ack).stdin(Stdio::null()).stdout(out).stderr(err);
    let line = cmdline(&cmd);
    let mut child = cmd.spawn().map_err(|e| format!("cannot spawn fio: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut tail = Tail { file: None, at_line_start: true, writes: 0 };
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("wait for fio: {e}"))? {
            break st;
        }
        tail.poll(&ack);
        if tail.writes >= target {
            let _ = child.kill(); // SIGKILL
            break child.wait().map_err(|e| format!("wait for fio: {e}"))?;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("fio did not finish in 180 s: {line}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let killed = status.signal() == Some(libc::SIGKILL);
    if !killed && !status.success() {
        let e = std::fs::read_to_string(dir.join("fio-write.err")).unwrap_or_default();
        let o = std::fs::read_to_string(dir.join("fio-write.out")).unwrap_or_default();
        return Err(format!("fio failed ({status}):\n  $ {line}\n  stdout: {o}\n  stderr: {e}"));
    }
    let text = std::fs::read_to_string(&ack).unwrap_or_default();
    let journal = Journal::parse(&text, v.writethrough, v.disk_size())?;
    if !killed && !journal.closed {
        return Err(format!(
            "fio finished but the journal has no clean-close record (a plugin built before \
             QURING_FIO_ACK_LOG existed? rebuild it): {line}"
        ));
    }
    // Killed after the clean close (the kill came late, while fio printed its report):
    // a clean state like a finished run.
    Ok(KillState { variant: *v, img, journal, killed, target })
}

/// Runs `f` until it does not fail on the image lock (the killed process's descriptors
/// may outlive it by a moment while io_uring tears down), for at most 10 s.
fn retry_locked(f: impl Fn() -> Run) -> Run {
    let t0 = Instant::now();
    loop {
        let r = f();
        let locked = r.status() == 1 && (r.stderr.contains("lock") || r.stdout.contains("lock"));
        if !locked || t0.elapsed() > Duration::from_secs(10) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// The checks

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    promised_units: usize,
    other_units: usize,
    /// Non-promised units torn at cluster granularity (clusters smaller than a unit).
    torn_units: usize,
    check_exit_3: bool,
}

/// Consistency, then data: see the module documentation (steps 3-5).
fn check_state(dir: &Path, st: &KillState) -> Result<Stats, String> {
    let img = s(&st.img);
    let mut stats = Stats::default();
    if st.variant.lazy() {
        let r = retry_locked(|| quring(["io", "-c", "flush", &img]));
        if r.status() != 0 {
            return Err(format!("repair open of the lazy-refcount image failed:\n{}", r.describe()));
        }
    }
    let q = retry_locked(|| qemu_img(["check", &img]));
    let ok = if st.variant.lazy() { q.status() == 0 } else { matches!(q.status(), 0 | 3) };
    if !ok {
        return Err(format!("qemu-img check failed (exit {}):\n{}", q.status(), q.describe()));
    }
    stats.check_exit_3 = q.status() == 3;
    let qc = quring(["check", &img]);
    if qc.status() != q.status() {
        return Err(format!(
            "quring check (exit {}) disagrees with qemu-img check (exit {}):\n{}\n{}",
            qc.status(),
            q.status(),
            qc.describe(),
            q.describe()
        ));
    }

    let (a, b) = (dir.join("qemu.raw"), dir.join("quring.raw"));
    let r = qemu_img(["convert", "-O", "raw", &img, &s(&a)]);
    if r.status() != 0 {
        return Err(format!("qemu-img convert failed:\n{}", r.describe()));
    }
    let r = quring(["convert", "-O", "raw", &img, &s(&b)]);
    if r.status() != 0 {
        return Err(format!("quring convert failed:\n{}", r.describe()));
    }
    if let Some(off) = first_difference(&a, &b).map_err(|e| e.to_string())? {
        return Err(format!("quring and qemu-img read different data: first difference at {off:#x}"));
    }
    let _ = std::fs::remove_file(&b);

    let promised = st.journal.promised_units()?;
    let disk = std::fs::read(&a).map_err(|e| format!("read {}: {e}", a.display()))?;
    if disk.len() as u64 != st.variant.disk_size() {
        return Err(format!("raw disk has {} bytes, want {}", disk.len(), st.variant.disk_size()));
    }
    let nonzero: BTreeSet<u64> = disk
        .chunks(UNIT as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&x| x != 0))
        .map(|(i, _)| i as u64)
        .collect();
    // With clusters smaller than a unit, a write that was in flight at the kill (never
    // promised) may be torn at cluster granularity: some of its clusters mapped, the others
    // still unallocated (zeros), as a disk tears a write at sector granularity. Such a unit
    // (zero clusters beside non-zero ones) is not a fio block and is not verified; a
    // promised unit is always verified, and a non-promised unit without a zero cluster must
    // still be a whole fio block.
    let cluster = st.variant.cluster_bytes();
    let torn: BTreeSet<u64> = if cluster < UNIT {
        nonzero
            .iter()
            .copied()
            .filter(|u| !promised.contains(u))
            .filter(|&u| {
                let c = &disk[(u * UNIT) as usize..((u + 1) * UNIT) as usize];
                c.chunks(cluster as usize).any(|p| p.iter().all(|&x| x == 0))
            })
            .collect()
    } else {
        BTreeSet::new()
    };
    drop(disk);
    let verify: BTreeSet<u64> = promised.union(&nonzero).copied().filter(|u| !torn.contains(u)).collect();
    stats.promised_units = promised.len();
    stats.other_units = verify.len() - promised.len();
    stats.torn_units = torn.len();
    if let Err(bad) = fio_verify(dir, &a, &verify) {
        let lost: Vec<u64> = promised.difference(&nonzero).map(|u| u * UNIT).collect();
        let mut msg = format!("fio verify failed on {} units\n", bad.len());
        if let Some(first) = lost.first() {
            msg += &format!("{} promised units read back as zeros (lost), the first at {first:#x}\n", lost.len());
        }
        for (off, what) in bad.iter().take(20) {
            let kind = if promised.contains(&(off / UNIT)) {
                "PROMISED (completed before a completed flush)"
            } else {
                "not promised, but non-zero and no fio block for this offset"
            };
            msg += &format!("  unit {off:#x}: {kind}: {what}\n");
        }
        return Err(msg);
    }
    let _ = std::fs::remove_file(&a);
    Ok(stats)
}

/// fio reads `units` of the raw file through a replayed iolog with `verify=crc32c`.
/// Returns the failing units (byte offset, fio's message).
fn fio_verify(dir: &Path, raw: &Path, units: &BTreeSet<u64>) -> Result<(), Vec<(u64, String)>> {
    if units.is_empty() {
        return Ok(());
    }
    let f = raw.display();
    let mut log = format!("fio version 2 iolog\n{f} add\n{f} open\n");
    // One read per unit, so that fio reports every bad unit (it stops checking a read at
    // its first bad header).
    for u in units {
        log += &format!("{f} read {} {UNIT}\n", u * UNIT);
    }
    log += &format!("{f} close\n");
    let iolog = dir.join("verify.iolog");
    std::fs::write(&iolog, log).unwrap();
    let mut c = Command::new("fio");
    c.args([
        "--name=verify".to_string(),
        "--ioengine=psync".into(),
        format!("--read_iolog={}", iolog.display()),
        "--verify=crc32c".into(),
        "--verify_interval=4k".into(),
        "--verify_fatal=0".into(),
        "--continue_on_error=verify".into(),
        "--output-format=json".into(),
    ])
    .current_dir(dir);
    let r = run_with_timeout(&mut c, Duration::from_secs(120));
    // fio's verify messages: "verify: bad magic header 0, wanted acca at file F offset N,
    // length 4096 (...)", "crc32c: verify failed at file F offset N, ...".
    let mut bad = Vec::new();
    for l in r.stderr.lines() {
        if let Some(i) = l.find(" at file ") {
            let off = l[i..].split(" offset ").nth(1).and_then(|t| t.split([',', ' ']).next()?.parse::<u64>().ok());
            bad.push((off.unwrap_or(u64::MAX), l[..i].trim().to_string()));
        }
    }
    let bytes = r
        .stdout
        .find('{')
        .and_then(|i| serde_json::from_str::<serde_json::Value>(&r.stdout[i..]).ok())
        .and_then(|v| v["jobs"][0]["read"]["io_bytes"].as_u64());
    let want = units.len() as u64 * UNIT;
    if bad.is_empty() && (r.status() != 0 || bytes != Some(want)) {
        bad.push((u64::MAX, format!("fio verify run failed or read {bytes:?} bytes, not {want}:\n{}", r.describe())));
    }
    if bad.is_empty() { Ok(()) } else { Err(bad) }
}

// ---------------------------------------------------------------------------------------
// The tests

fn ensure_fio() {
    let have = || Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-deps.sh");
        let r = run_with_timeout(&mut Command::new(script), Duration::from_secs(600));
        assert!(r.success() && have(), "fio is missing and could not be installed:\n{}", r.describe());
    }
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("quring-sigkill-").tempdir_in("/dev/shm").unwrap_or_else(|_| tempdir())
}

/// The kill point of `seed`: a number of write completions, or more writes than fio does
/// (a clean finish) one time in ten.
fn kill_target(seed: u64, v: &Variant) -> u64 {
    let mut rng = Rng(seed ^ 0x0073_6967_6b69_6c6c); // "sigkill"
    // Up to 5% beyond the expected count: a few targets fall after the last write and the
    // kill hits the final flush, the close or fio's report.
    let writes = v.disk_size() / v.avg_write * 105 / 100;
    if rng.below(10) == 0 { u64::MAX } else { 1 + rng.below(writes) }
}

/// Keeps the evidence of a failing state under /tmp and describes it.
fn keep(dir: &Path, seed: u64) -> String {
    let dst = std::env::temp_dir().join(format!("quring-sigkill-seed{seed}"));
    let _ = std::fs::create_dir_all(&dst);
    for f in ["disk.qcow2", "ack.log", "fio-write.out", "fio-write.err", "verify.iolog"] {
        let _ = std::fs::copy(dir.join(f), dst.join(f));
    }
    format!("image, journal and fio output kept in {}", dst.display())
}

#[test]
fn sigkill_states() {
    ensure_fio();
    let t0 = Instant::now();
    let kills = env_u64("QURING_SIGKILL_KILLS").unwrap_or(36);
    let base = env_u64("QURING_SIGKILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 1_000_000 * 1000
    });
    let keep_going = std::env::var_os("QURING_SIGKILL_KEEP_GOING").is_some();
    eprintln!(
        "sigkill: {kills} kill states from seed {base} (reproduce one: QURING_SIGKILL_SEED=<seed> QURING_SIGKILL_KILLS=1)"
    );
    let (mut killed, mut finished, mut leaks, mut promised, mut other, mut writes, mut flushes) = (0, 0, 0, 0, 0, 0, 0);
    let mut torn = 0;
    let mut per_variant: HashMap<&str, u64> = HashMap::new();
    let mut violations = Vec::new();
    for k in 0..kills {
        let seed = base + k;
        let v = VARIANTS[(seed % VARIANTS.len() as u64) as usize];
        let target = kill_target(seed, &v);
        let dir = work_dir();
        let t1 = Instant::now();
        let mut t_kill = Duration::ZERO;
        let res = kill_once(dir.path(), seed, &v, target).and_then(|st| {
            t_kill = t1.elapsed();
            let stats = check_state(dir.path(), &st)?;
            Ok((st, stats))
        });
        match res {
            Ok((st, stats)) => {
                if st.killed {
                    killed += 1
                } else {
                    finished += 1
                }
                leaks += stats.check_exit_3 as u64;
                promised += stats.promised_units;
                other += stats.other_units;
                torn += stats.torn_units;
                writes += st.journal.writes.len();
                flushes += st.journal.flushes;
                *per_variant.entry(v.name).or_default() += 1;
                if std::env::var_os("QURING_SIGKILL_VERBOSE").is_some() {
                    eprintln!(
                        "sigkill: seed {seed} [{}] {} after {} of target {}: {} writes, {} promised units, {} other units, {} flushes{}; fio {:.2?}, checks {:.2?}",
                        v.name,
                        if st.killed { "killed" } else { "finished" },
                        st.journal.writes.len(),
                        st.target,
                        st.journal.writes.len(),
                        stats.promised_units,
                        stats.other_units,
                        st.journal.flushes,
                        if stats.check_exit_3 { ", leaks" } else { "" },
                        t_kill,
                        t1.elapsed() - t_kill
                    );
                }
            }
            Err(e) => {
                let msg = format!(
                    "SIGKILL CRASH VIOLATION, seed {seed} (variant {}, kill after {} write completions; \
                     reproduce: QURING_SIGKILL_SEED={seed} QURING_SIGKILL_KILLS=1 cargo test -p quring-tests --test sigkill \
                     -- --nocapture sigkill_states), after {k} good kill states:\n{e}\n{}",
                    v.name,
                    if target == u64::MAX { "all".to_string() } else { target.to_string() },
                    keep(dir.path(), seed)
                );
                if !keep_going {
                    panic!("{msg}");
                }
                eprintln!("{msg}");
                violations.push(format!("seed {seed} ({})", v.name));
            }
        }
        if (k + 1) % 50 == 0 {
            eprintln!("sigkill: {} states, {:.0?}", k + 1, t0.elapsed());
        }
    }
    let mut pv: Vec<_> = per_variant.into_iter().collect();
    pv.sort();
    eprintln!(
        "sigkill: {} kill states checked ({killed} killed, {finished} finished first; {leaks} with leaks) in {:.1?}, \
         seeds {base}..{}: {writes} acknowledged writes, {flushes} flushes, {promised} promised 4 KiB units and \
         {other} other non-zero units verified by fio, {torn} in-flight units torn at cluster granularity; per variant: {pv:?}",
        killed + finished,
        t0.elapsed(),
        base + kills.saturating_sub(1),
    );
    assert!(violations.is_empty(), "{} violations: {}", violations.len(), violations.join(", "));
    if kills >= VARIANTS.len() as u64 * 2 {
        // Not vacuous: states with promised data, and some killed mid-stream.
        assert!(promised > 0 && killed > 0, "no promised data or no kill mid-stream");
    }
}

/// The checks can fail: damage done to a good kill state after the kill must be reported.
#[test]
fn sigkill_check_detects_damage() {
    ensure_fio();
    let dir = work_dir();
    // Writethrough: every completed write is promised.
    let v = VARIANTS.iter().find(|v| v.writethrough).copied().unwrap();
    let st = kill_once(dir.path(), 7, &v, 300).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.killed, "fio must still be writing after 300 completions");
    let pristine = dir.path().join("pristine.qcow2");
    std::fs::copy(&st.img, &pristine).unwrap();
    let stats = check_state(dir.path(), &st).unwrap_or_else(|e| panic!("the undamaged state must pass: {e}"));
    assert!(stats.promised_units >= 300, "{stats:?}");

    let units: Vec<u64> = st.journal.promised_units().unwrap().into_iter().collect();
    let (x, y) = (units[units.len() / 3] * UNIT, units[2 * units.len() / 3] * UNIT);
    let restore = || std::fs::copy(&pristine, &st.img).map(|_| ()).unwrap();

    // 1. A flipped byte in a promised unit: fio's checksum catches it.
    restore();
    let hx = host_offset(&st.img, x);
    patch_bytes(&st.img, hx + 1000, &[0x5a ^ read_bytes(&st.img, hx + 1000, 1)[0]]);
    let e = check_state(dir.path(), &st).expect_err("a corrupted promised unit must be reported");
    eprintln!("damage 1 detected:\n{e}");
    assert!(e.contains(&format!("unit {x:#x}: PROMISED")), "{e}");

    // 2. A promised unit's data replaced by another unit's (misplaced data).
    restore();
    let data = read_bytes(&st.img, host_offset(&st.img, y), UNIT as usize);
    patch_bytes(&st.img, host_offset(&st.img, x), &data);
    let e = check_state(dir.path(), &st).expect_err("misplaced data must be reported");
    eprintln!("damage 2 detected:\n{e}");
    assert!(e.contains(&format!("unit {x:#x}: PROMISED")) && e.contains("bad header offset"), "{e}");

    // 3. A lost L2 entry (what a missing metadata write-back would leave): qemu-img check
    //    only sees a leak, which is allowed; the verify pass finds the lost promised data.
    restore();
    let l2e = l2_entry_offset(&st.img, x);
    patch_be64(&st.img, l2e, 0);
    let e = check_state(dir.path(), &st).expect_err("a lost flushed write must be reported");
    eprintln!("damage 3 detected:\n{e}");
    let cluster = 1u64 << read_be32(&st.img, 20);
    let in_cluster = units.iter().filter(|&&u| u * UNIT / cluster == x / cluster).count();
    assert!(
        e.contains(&format!("unit {x:#x}: PROMISED"))
            && e.contains(&format!("{in_cluster} promised units read back as zeros"))
            && e.contains(&format!("fio verify failed on {in_cluster} units")),
        "{e}"
    );

    // 4. A wrong refcount: the consistency check fails.
    restore();
    let rc = refcount_entry_offset(&st.img, host_offset(&st.img, x));
    patch_be16(&st.img, rc, 0);
    let e = check_state(dir.path(), &st).expect_err("a refcount error must be reported");
    eprintln!("damage 4 detected:\n{e}");
    assert!(e.contains("qemu-img check failed (exit 2)"), "{e}");

    // 5. A write the journal calls promised that never reached the image (the journal
    //    is cut so that unit x counts as promised in a fresh, empty image).
    let empty = dir.path().join("disk.qcow2");
    let r = quring(["create", "-q", "-o", v.create, &s(&empty), &v.disk_size().to_string()]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let lost = KillState {
        journal: Journal { writes: vec![(x, UNIT)], promised: 1, flushes: 1, closed: false },
        img: empty,
        ..st
    };
    let e = check_state(dir.path(), &lost).expect_err("a promised write missing from the image must be reported");
    eprintln!("damage 5 detected:\n{e}");
    assert!(e.contains(&format!("unit {x:#x}: PROMISED")), "{e}");
}

/// The journal parser's promises: writes before a completed flush's submission only.
#[test]
fn journal_promises() {
    let text = "W 0 4096 0\nS 0x1\nW 4096 8192 0\nS 0x2\nF 0x1 0\nW 16384 4096 0\n";
    let j = Journal::parse(text, false, 1 << 20).unwrap();
    assert_eq!((j.writes.len(), j.promised, j.flushes), (3, 1, 1));
    assert_eq!(j.promised_units().unwrap().into_iter().collect::<Vec<_>>(), vec![0]);
    // The same in writethrough mode: everything completed.
    assert_eq!(Journal::parse(text, true, 1 << 20).unwrap().promised, 3);
    // A clean close promises everything; a flush resubmitted with the same id counts from
    // its last submission.
    let j =
        Journal::parse("W 0 4096 0\nS 0x1\nW 4096 4096 0\nS 0x1\nF 0x1 0\nW 8192 4096 0\n", false, 1 << 20).unwrap();
    assert_eq!(j.promised, 2);
    assert_eq!(Journal::parse("W 0 4096 0\nC\n", false, 1 << 20).unwrap().promised, 1);
    // A torn last record is ignored; errors and double writes are violations.
    assert_eq!(Journal::parse("W 0 4096 0\nW 40", false, 1 << 20).unwrap().writes.len(), 1);
    assert!(Journal::parse("W 0 4096 -5\n", false, 1 << 20).is_err());
    assert!(Journal::parse("F 0x9 0\n", false, 1 << 20).is_err());
    assert!(Journal::parse("W 0 8192 0\nW 4096 4096 0\n", false, 1 << 20).unwrap().promised_units().is_err());
}

// ---------------------------------------------------------------------------------------
// qcow2 lookups for the damage test (standard L2 entries, 16-bit refcounts)

fn host_offset(img: &Path, guest: u64) -> u64 {
    let map = qemu_img(["map", "--output=json", &s(img)]).ok();
    map.json()
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| {
            let (st, len) = (e["start"].as_u64()?, e["length"].as_u64()?);
            (e["data"].as_bool()? && st <= guest && guest < st + len).then_some(e["offset"].as_u64()? + guest - st)
        })
        .unwrap_or_else(|| panic!("guest {guest:#x} is not mapped"))
}

fn l2_entry_offset(img: &Path, guest: u64) -> u64 {
    let cluster_bits = read_be32(img, 20);
    let l1 = read_be64(img, 40);
    let l2_entries = 1u64 << (cluster_bits - 3);
    let cl = guest >> cluster_bits;
    let l2 = read_be64(img, l1 + 8 * (cl / l2_entries)) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "guest {guest:#x} has no L2 table");
    l2 + 8 * (cl % l2_entries)
}

fn refcount_entry_offset(img: &Path, host: u64) -> u64 {
    let cluster_bits = read_be32(img, 20);
    assert_eq!(read_be32(img, 96), 4, "16-bit refcounts expected");
    let table = read_be64(img, 48);
    let per_block = 1u64 << (cluster_bits - 1);
    let cl = host >> cluster_bits;
    let block = read_be64(img, table + 8 * (cl / per_block));
    assert_ne!(block, 0, "host {host:#x} has no refcount block");
    block + 2 * (cl % per_block)
}
