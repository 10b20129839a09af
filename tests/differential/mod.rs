//! The differential runner shared by `tests/differential_write.rs` (the bounded suite) and
//! `tests/diff_campaign.rs` (long campaigns).
//!
//! A [`Plan`] is data: the files to build with qemu-img/qemu-io (backing files first, the
//! image under test last), then a list of [`Step`]s. The runner builds the files once,
//! copies the image under test twice, applies every step to one copy with `quring io` and
//! to the other with `qemu-io`, and after every segment (the commands between two reopen
//! points, or one scenario step) requires:
//!
//! * both sides succeeded (or, in a corrupt-image plan, both failed or both succeeded),
//! * `qemu-img compare` finds the two copies identical,
//! * `qemu-img check` passes on the quring-written copy, and `quring check` exits like it.
//!
//! At the end quring reads its whole copy (`quring convert -O raw`), which must equal
//! QEMU's read of the other copy, and every internal snapshot is reverted on copies of
//! both images and compared.
//! A failing plan can be shrunk ([`minimize`]) and is reported as a shell script
//! ([`Plan::script`]) that rebuilds the case from scratch.

#![allow(dead_code)]

pub mod generator;
pub mod scenario;

use crate::common::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// How a file of a plan is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    Raw,
    /// `qemu-img create -f qcow2 -o OPTS [-b B -F FMT]`.
    Qcow2 {
        opts: String,
        backing: Option<(String, String)>,
    },
}

/// Something done to a file while building it (by QEMU's tools, or by patching bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// One `qemu-io` command.
    Io(String),
    /// `qemu-img snapshot -c NAME`.
    Snapshot(String),
    /// Bytes written at a file offset (corrupt-image scenarios).
    Poke(u64, Vec<u8>),
    /// `qemu-img ARGS FILE` (e.g. `resize 65M`).
    Img(Vec<String>),
}

/// A file of a plan; built in order, so backing files come first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub actions: Vec<Action>,
}

/// One step applied to both copies of the image under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A command run by `quring io` on one copy and by `qemu-io` on the other.
    Io(String),
    /// Like `Io`, but both sides open the image read-only (`-r`); a segment of its own.
    Ro(String),
    /// End of a segment: the quring process closes the image (the next command opens it
    /// again), and both copies are compared and checked.
    Reopen,
    /// `qemu-io` commands (separated by ` ; `) run on both copies (e.g. `write -c`, which
    /// quring io does not have, or a write followed by `sigraise 9`: QEMU dying with lazy
    /// refcounts); a segment of its own.
    Both(String),
    /// `qemu-img ARGS IMG` on both copies (e.g. `snapshot -c s2`; a snapshot step runs as
    /// `quring snapshot ARGS` on quring's copy); a segment of its own.
    Img(Vec<String>),
    /// Corrupt plans: in the next segment quring and QEMU may differ in kind (a documented
    /// difference); if they do, the copies are no longer compared, only crashes count.
    Either,
}

/// A complete, reproducible differential case.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// The configuration in words (for reports).
    pub desc: String,
    /// Files in build order; the last one is the image under test (qcow2).
    pub files: Vec<FileSpec>,
    pub steps: Vec<Step>,
    /// A corrupt-image plan: each segment must fail on both sides or succeed on both
    /// (with equal content while everything succeeded); quring must never crash.
    pub corrupt: bool,
    /// Extra `quring io` options (cache mode, L2 cache size).
    pub quring_opts: Vec<String>,
    /// The image under test has an external data file (see [`DataFile`]).
    pub data_file: Option<DataFile>,
}

/// An external data file of the image under test (`data_file`, incompatible bit 2).
///
/// Every image has its own data file beside it, named like the image with `.data` for
/// `.qcow2` ([`data_path`]), and its header names that file by its absolute path: QEMU
/// resolves a relative data file name against the current directory, not the image's
/// directory, so absolute names are what keeps the copies apart. The starting image is
/// created with `data_file=DIR/NAME.data`; each copy gets a copy of that data file and
/// `qemu-img amend -o data_file=` naming its own, so that no two copies ever share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFile {
    /// `data_file_raw=on`: the data file is itself the disk; after every segment it must
    /// equal the guest content.
    pub raw: bool,
}

/// The data file of the image `img` (`x.qcow2` -> `x.data`).
pub fn data_path(img: &Path) -> PathBuf {
    img.with_extension("data")
}

/// The `-o` options of `qemu-img create` that give `img` its data file.
fn data_file_opts(df: DataFile, img: &Path) -> String {
    format!("data_file={},data_file_raw={}", s(&data_path(img)), if df.raw { "on" } else { "off" })
}

/// What went wrong, coarsely: the minimizer keeps a reduction only when the failure
/// stays of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// Building the files with QEMU's tools failed (a generator or scenario error).
    Build,
    /// quring crashed, was killed or timed out.
    QuringCrash,
    /// quring io reported an error where qemu-io did not.
    QuringError,
    /// qemu-io reported an error where quring did not.
    QemuError,
    /// Content differs after a segment.
    Content,
    /// `qemu-img check` is not clean on the quring-written copy.
    Check,
    /// `quring check` exits differently from `qemu-img check`.
    CheckMismatch,
    /// An internal snapshot reverted differently.
    Snapshot,
    /// The quring-written copy takes far more disk space than the qemu-written one.
    Space,
    /// quring reads its copy differently from how QEMU reads the other one.
    Read,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailKind,
    /// Index of the segment after which the problem showed (0-based).
    pub segment: usize,
    pub detail: String,
}

/// Counts of one successful execution.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Commands applied through quring io.
    pub ops: u64,
    /// Segments (compare points).
    pub segments: u64,
    /// Disk space (allocated bytes) of the quring-written and the qemu-written copy at
    /// the end.
    pub space: (u64, u64),
}

/// Runtime knobs.
#[derive(Debug, Clone)]
pub struct RunOpts {
    /// Time limit of one quring io process.
    pub quring_timeout: Duration,
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts { quring_timeout: Duration::from_secs(60) }
    }
}

fn q(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./,:+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl Plan {
    /// The image under test.
    pub fn image(&self) -> &FileSpec {
        self.files.last().expect("a plan has files")
    }

    /// Commands applied by quring.
    pub fn ops(&self) -> u64 {
        self.steps.iter().filter(|s| matches!(s, Step::Io(_) | Step::Ro(_))).count() as u64
    }

    /// Segments: runs of commands between compare points, each with its flags.
    fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut cur: Vec<String> = Vec::new();
        let mut either = false;
        let flush = |cur: &mut Vec<String>, out: &mut Vec<Segment>, either: &mut bool| {
            if !cur.is_empty() {
                out.push(Segment::Io { cmds: std::mem::take(cur), ro: false, either: *either });
                *either = false;
            }
        };
        for s in &self.steps {
            match s {
                Step::Io(c) => cur.push(c.clone()),
                Step::Reopen => flush(&mut cur, &mut out, &mut either),
                Step::Either => {
                    flush(&mut cur, &mut out, &mut either);
                    either = true;
                }
                Step::Ro(c) => {
                    flush(&mut cur, &mut out, &mut either);
                    out.push(Segment::Io { cmds: vec![c.clone()], ro: true, either });
                    either = false;
                }
                Step::Both(c) => {
                    flush(&mut cur, &mut out, &mut either);
                    out.push(Segment::Both(c.clone()));
                }
                Step::Img(a) => {
                    flush(&mut cur, &mut out, &mut either);
                    out.push(Segment::Img(a.clone()));
                }
            }
        }
        flush(&mut cur, &mut out, &mut either);
        out
    }

    /// Snapshot names the plan creates (at build time or as steps) and does not delete.
    pub fn snapshots(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .image()
            .actions
            .iter()
            .filter_map(|a| if let Action::Snapshot(n) = a { Some(n.clone()) } else { None })
            .collect();
        for s in &self.steps {
            if let Step::Img(a) = s
                && a.len() == 3
                && a[0] == "snapshot"
            {
                match a[1].as_str() {
                    "-c" => v.push(a[2].clone()),
                    "-d" => v.retain(|n| *n != a[2]),
                    _ => {}
                }
            }
        }
        v
    }

    /// A shell script that rebuilds the case from scratch and runs both sides, comparing
    /// after every segment (what a bug report needs).
    pub fn script(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# {}: {}", self.name, self.desc);
        let _ = writeln!(o, "cd \"$(mktemp -d)\"");
        for f in &self.files {
            let fmt = match &f.kind {
                FileKind::Raw => {
                    let _ = writeln!(o, "qemu-img create -q -f raw {} {}", q(&f.name), f.size);
                    "raw"
                }
                FileKind::Qcow2 { opts, backing } => {
                    let b = backing.as_ref().map(|(b, bf)| format!(" -b {} -F {bf}", q(b))).unwrap_or_default();
                    let df = match self.data_file {
                        Some(df) if std::ptr::eq(f, self.image()) => {
                            let stem = Path::new(&f.name).with_extension("data");
                            let d = format!(
                                "data_file=\"$PWD\"/{},data_file_raw={}",
                                q(&s(&stem)),
                                if df.raw { "on" } else { "off" }
                            );
                            if opts.is_empty() { d } else { format!(",{d}") }
                        }
                        _ => String::new(),
                    };
                    let o_ =
                        if opts.is_empty() && df.is_empty() { String::new() } else { format!("-o {}{df} ", q(opts)) };
                    let _ = writeln!(o, "qemu-img create -q -f qcow2 {o_}{}{b} {}", q(&f.name), f.size);
                    "qcow2"
                }
            };
            let mut ios: Vec<String> = Vec::new();
            let flush_ios = |ios: &mut Vec<String>, o: &mut String| {
                if !ios.is_empty() {
                    let cs: Vec<String> = ios.iter().map(|c| format!("-c {}", q(c))).collect();
                    let _ = writeln!(o, "qemu-io -f {fmt} {} {} >/dev/null", cs.join(" "), q(&f.name));
                    ios.clear();
                }
            };
            for a in &f.actions {
                match a {
                    Action::Io(c) => {
                        if starts_own_process(c) {
                            flush_ios(&mut ios, &mut o);
                        }
                        ios.push(c.clone());
                    }
                    Action::Snapshot(n) => {
                        flush_ios(&mut ios, &mut o);
                        let _ = writeln!(o, "qemu-img snapshot -c {} {}", q(n), q(&f.name));
                    }
                    Action::Img(args) => {
                        flush_ios(&mut ios, &mut o);
                        let a: Vec<String> = img_args(args, &f.name).iter().map(|x| q(x)).collect();
                        let _ = writeln!(o, "qemu-img {}", a.join(" "));
                    }
                    Action::Poke(off, bytes) => {
                        flush_ios(&mut ios, &mut o);
                        let esc: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
                        let _ = writeln!(
                            o,
                            "printf '{esc}' | dd of={} bs=1 seek={off} conv=notrunc 2>/dev/null",
                            q(&f.name)
                        );
                    }
                }
            }
            flush_ios(&mut ios, &mut o);
        }
        let img = &self.image().name;
        let _ = writeln!(o, "cp {} quring.qcow2; cp {} qemu.qcow2", q(img), q(img));
        if self.data_file.is_some() {
            // Each copy gets its own data file (the header names it by absolute path).
            let d = q(&s(&Path::new(img).with_extension("data")));
            let _ = writeln!(
                o,
                "for i in quring qemu; do cp --sparse=always {d} $i.data; \
                 qemu-img amend -f qcow2 -o data_file=\"$PWD/$i.data\" $i.qcow2; done"
            );
        }
        let raw_check = if self.data_file.is_some_and(|df| df.raw) {
            " && qemu-img compare -f raw -F qcow2 quring.data qemu.qcow2"
        } else {
            ""
        };
        for seg in self.segments() {
            match seg {
                Segment::Io { cmds, ro, .. } => {
                    let cs: Vec<String> = cmds.iter().map(|c| format!("-c {}", q(c))).collect();
                    let r = if ro { "-r " } else { "" };
                    let x: String = self.quring_opts.iter().map(|x| format!("{} ", q(x))).collect();
                    let _ = writeln!(o, "quring io -f qcow2 {x}{r}{} quring.qcow2", cs.join(" "));
                    let _ = writeln!(o, "qemu-io -f qcow2 {r}{} qemu.qcow2 >/dev/null", cs.join(" "));
                }
                Segment::Both(c) => {
                    let cs: Vec<String> = both_cmds(&c).iter().map(|x| format!("-c {}", q(x))).collect();
                    let _ = writeln!(o, "for i in quring qemu; do qemu-io -f qcow2 {} $i.qcow2; done", cs.join(" "));
                }
                Segment::Img(a) => {
                    let a: Vec<String> = a.iter().map(|x| q(x)).collect();
                    let _ = writeln!(o, "for i in quring qemu; do qemu-img {} $i.qcow2; done", a.join(" "));
                }
            }
            let _ =
                writeln!(o, "qemu-img compare quring.qcow2 qemu.qcow2 && qemu-img check -q quring.qcow2{raw_check}");
        }
        if !self.corrupt {
            let _ = writeln!(
                o,
                "quring convert -O raw quring.qcow2 read.raw && qemu-img compare -f raw -F qcow2 read.raw qemu.qcow2"
            );
        }
        o
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Io { cmds: Vec<String>, ro: bool, either: bool },
    Both(String),
    Img(Vec<String>),
}

/// The commands of a [`Step::Both`].
fn both_cmds(c: &str) -> Vec<String> {
    c.split(" ; ").map(str::to_string).collect()
}

/// A compressed write starts a new qemu-io process while building: QEMU 10.0 keeps the
/// partly used cluster of its last compressed write across requests, and when that cluster
/// was freed and reused meanwhile (as an L2 table) it writes compressed data over it and
/// marks the image corrupt. Minimal case, 512-byte clusters, 335360-byte image:
/// `write -c 334848 512`, `write -z 334848 512`, `write -c 199168 512`.
fn starts_own_process(cmd: &str) -> bool {
    cmd.starts_with("write -c")
}

/// `qemu-img` arguments with the file in place of `@` (appended when there is none).
fn img_args(args: &[String], file: &str) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|a| if a == "@" { file.to_string() } else { a.clone() }).collect();
    if !args.iter().any(|a| a == "@") {
        v.push(file.to_string());
    }
    v
}

fn fail(kind: FailKind, segment: usize, detail: impl Into<String>) -> Failure {
    Failure { kind, segment, detail: detail.into() }
}

/// True when a qemu-io or quring io run reported a failed command.
fn io_failed(r: &Run) -> bool {
    !r.success()
        || r.stdout.contains("failed")
        || r.stderr.contains("failed")
        || r.stdout.contains("Error")
        || r.stderr.contains("rror")
}

fn crashed(r: &Run) -> bool {
    r.timed_out || r.signal.is_some() || r.code == Some(101) || r.stderr.contains("panicked")
}

/// The cluster size of the image under test (from its `-o` options; QEMU's default).
fn cluster_size_of(plan: &Plan) -> u64 {
    let FileKind::Qcow2 { opts, .. } = &plan.image().kind else { return 64 * KIB };
    opts.split(',')
        .find_map(|kv| kv.strip_prefix("cluster_size="))
        .and_then(|v| scenario::eval(v, 0, 0).ok())
        .unwrap_or(64 * KIB)
}

/// Allocated bytes of a file (st_blocks).
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// Length and modification time of a file (a read-only open must change neither).
fn file_stamp(p: &Path) -> (u64, Option<std::time::SystemTime>) {
    let m = std::fs::metadata(p).ok();
    (m.as_ref().map_or(0, |m| m.len()), m.and_then(|m| m.modified().ok()))
}

/// Copies a file keeping its holes (`std::fs::copy` writes the holes of a preallocated
/// 2 GiB image out as zeros).
fn copy(from: &Path, to: &Path) {
    let r = run(std::process::Command::new("cp").args(["--sparse=always", &s(from), &s(to)]));
    assert!(r.success(), "copy {} -> {}:\n{}", from.display(), to.display(), r.describe());
}

/// Builds the plan's files in `dir`; returns the path of the image under test.
pub fn build(plan: &Plan, dir: &Path) -> Result<PathBuf, Failure> {
    let under_test = plan.files.len() - 1;
    for (fi, f) in plan.files.iter().enumerate() {
        let path = dir.join(&f.name);
        let _ = std::fs::remove_file(&path);
        let (fmt, r) = match &f.kind {
            FileKind::Raw => ("raw", qemu_img(["create", "-q", "-f", "raw", &s(&path), &f.size.to_string()])),
            FileKind::Qcow2 { opts, backing } => {
                let mut a: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
                let opts = match plan.data_file {
                    Some(df) if fi == under_test => {
                        let _ = std::fs::remove_file(data_path(&path));
                        let d = data_file_opts(df, &path);
                        if opts.is_empty() { d } else { format!("{opts},{d}") }
                    }
                    _ => opts.clone(),
                };
                if !opts.is_empty() {
                    a.extend(["-o".into(), opts]);
                }
                if let Some((b, bf)) = backing {
                    a.extend(["-b".into(), b.clone(), "-F".into(), bf.clone()]);
                }
                a.push(s(&path));
                a.push(f.size.to_string());
                ("qcow2", qemu_img(&a))
            }
        };
        if !r.success() {
            return Err(fail(FailKind::Build, 0, format!("creating {}:\n{}", f.name, r.describe())));
        }
        let mut ios: Vec<String> = Vec::new();
        let run_ios = |ios: &mut Vec<String>| -> Result<(), Failure> {
            if ios.is_empty() {
                return Ok(());
            }
            let mut a = vec!["-f".to_string(), fmt.to_string()];
            for c in ios.iter() {
                a.push("-c".into());
                a.push(c.clone());
            }
            a.push(s(&path));
            let r = qemu_io(&a);
            // `sigraise 9` (a crash with lazy refcounts) ends qemu-io by a signal.
            let killed = ios.iter().any(|c| c.starts_with("sigraise")) && r.signal.is_some();
            ios.clear();
            if !killed && io_failed(&r) {
                return Err(fail(FailKind::Build, 0, format!("building {}:\n{}", f.name, r.describe())));
            }
            Ok(())
        };
        for a in &f.actions {
            match a {
                Action::Io(c) => {
                    if starts_own_process(c) {
                        run_ios(&mut ios)?;
                    }
                    ios.push(c.clone());
                }
                Action::Snapshot(n) => {
                    run_ios(&mut ios)?;
                    let r = qemu_img(["snapshot", "-c", n, &s(&path)]);
                    if !r.success() {
                        return Err(fail(FailKind::Build, 0, format!("snapshot on {}:\n{}", f.name, r.describe())));
                    }
                }
                Action::Poke(off, bytes) => {
                    run_ios(&mut ios)?;
                    patch_bytes(&path, *off, bytes);
                }
                Action::Img(args) => {
                    run_ios(&mut ios)?;
                    let v = img_args(args, &s(&path));
                    let r = qemu_img(&v);
                    if !r.success() {
                        return Err(fail(FailKind::Build, 0, format!("qemu-img on {}:\n{}", f.name, r.describe())));
                    }
                }
            }
        }
        run_ios(&mut ios)?;
    }
    Ok(dir.join(&plan.image().name))
}

/// The arguments of `qemu-io` and `quring io` (same syntax): `-f qcow2`, `extra`, `-r`
/// when read-only, a `-c` per command, the image.
fn io_args(img: &Path, cmds: &[String], ro: bool, extra: &[String]) -> Vec<String> {
    let mut a = vec!["-f".to_string(), "qcow2".into()];
    a.extend(extra.iter().cloned());
    if ro {
        a.push("-r".into());
    }
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.push(s(img));
    a
}

fn quring_io(img: &Path, cmds: &[String], ro: bool, extra: &[String], opts: &RunOpts) -> Run {
    let mut a = vec!["io".to_string()];
    a.extend(io_args(img, cmds, ro, extra));
    quring_with_timeout(&a, opts.quring_timeout)
}

fn qemu_io_run(img: &Path, cmds: &[String], ro: bool) -> Run {
    qemu_io(io_args(img, cmds, ro, &[]))
}

fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let r = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &s(a), &s(b)]);
    if r.code != Some(0) {
        return Err(format!("qemu-img compare: the images differ:\n{}", r.describe()));
    }
    Ok(())
}

/// `qemu-img check` must be clean and `quring check` must agree. After a `qemu-img` step
/// that failed alike on both copies (`qemu_failed`: a `snapshot -c` that narrow refcounts
/// could not hold leaves leaked clusters behind, in QEMU's copy too), leaks alone (exit 3)
/// are accepted when QEMU's copy `other` leaks as well; the leaked clusters themselves
/// differ, as layouts do.
fn checks(img: &Path, other: &Path, seg: usize, qemu_failed: bool) -> Result<(), Failure> {
    let qc = qemu_img(["check", &s(img)]);
    let same_as_qemus = || qemu_failed && qc.code == Some(3) && qemu_img(["check", &s(other)]).code == Some(3);
    if qc.code != Some(0) && !same_as_qemus() {
        return Err(fail(
            FailKind::Check,
            seg,
            format!("qemu-img check of the quring-written copy:\n{}", qc.describe()),
        ));
    }
    let ours = quring(["check", &s(img)]);
    if ours.code != qc.code {
        return Err(fail(
            FailKind::CheckMismatch,
            seg,
            format!("quring check exit {:?}, qemu-img check exit {:?}:\n{}", ours.code, qc.code, ours.describe()),
        ));
    }
    Ok(())
}

/// Runs the plan's steps on fresh copies of `start` (in `start`'s directory, so that
/// relative backing file names resolve). `tag` keeps concurrent attempts apart.
pub fn execute(plan: &Plan, start: &Path, tag: &str, opts: &RunOpts) -> Result<Stats, Failure> {
    let dir = start.parent().expect("start image has a directory");
    let a = dir.join(format!("quring{tag}.qcow2"));
    let b = dir.join(format!("qemu{tag}.qcow2"));
    copy(start, &a);
    copy(start, &b);
    if plan.data_file.is_some() {
        for img in [&a, &b] {
            copy(&data_path(start), &data_path(img));
            let r = qemu_img(["amend", "-f", "qcow2", "-o", &format!("data_file={}", s(&data_path(img))), &s(img)]);
            if !r.success() {
                return Err(fail(
                    FailKind::Build,
                    0,
                    format!("giving {} its own data file:\n{}", s(img), r.describe()),
                ));
            }
        }
    }
    let res = execute_on(plan, &a, &b, tag, opts);
    if res.is_ok() {
        for img in [&a, &b] {
            let _ = std::fs::remove_file(img);
            if plan.data_file.is_some() {
                let _ = std::fs::remove_file(data_path(img));
            }
        }
    }
    res
}

/// With `data_file_raw`, the data file of quring's copy `a` must be the disk itself:
/// equal to the guest content of QEMU's copy `b` (which equals `a`'s).
fn raw_data_file_equal(plan: &Plan, a: &Path, b: &Path, seg: usize) -> Result<(), Failure> {
    if !plan.data_file.is_some_and(|df| df.raw) {
        return Ok(());
    }
    let r = qemu_img(["compare", "-f", "raw", "-F", "qcow2", &s(&data_path(a)), &s(b)]);
    if r.code != Some(0) {
        return Err(fail(
            FailKind::Content,
            seg,
            format!("data_file_raw: quring's data file differs from the disk:\n{}", r.describe()),
        ));
    }
    Ok(())
}

fn execute_on(plan: &Plan, a: &Path, b: &Path, tag: &str, opts: &RunOpts) -> Result<Stats, Failure> {
    let mut st = Stats::default();
    // In a corrupt plan, content is compared only while every step succeeded on both sides.
    let mut all_ok = true;
    // Set after a documented difference in kind: the copies have diverged.
    let mut diverged = false;
    // Set once a qemu-img step failed alike on both copies (see `checks`).
    let mut qemu_failed = false;
    for (i, seg) in plan.segments().into_iter().enumerate() {
        st.segments += 1;
        match &seg {
            Segment::Io { cmds, ro, either } => {
                st.ops += cmds.len() as u64;
                let before = file_stamp(a);
                let ra = quring_io(a, cmds, *ro, &plan.quring_opts, opts);
                if *ro && file_stamp(a) != before {
                    return Err(fail(
                        FailKind::QuringError,
                        i,
                        format!("a read-only quring io changed the image:\n{}", ra.describe()),
                    ));
                }
                let rb = qemu_io_run(b, cmds, *ro);
                let (fa, fb) = (io_failed(&ra), io_failed(&rb));
                if crashed(&ra) {
                    return Err(fail(FailKind::QuringCrash, i, format!("quring io crashed:\n{}", ra.describe())));
                }
                if plan.corrupt {
                    if diverged {
                        continue;
                    }
                    if fa != fb && *either {
                        diverged = true;
                        continue;
                    }
                    if fa != fb {
                        let kind = if fa { FailKind::QuringError } else { FailKind::QemuError };
                        return Err(fail(
                            kind,
                            i,
                            format!(
                                "outcomes differ in kind (quring {}, qemu-io {}):\n{}\n{}",
                                if fa { "failed" } else { "succeeded" },
                                if fb { "failed" } else { "succeeded" },
                                ra.describe(),
                                rb.describe()
                            ),
                        ));
                    }
                    all_ok &= !fa;
                } else {
                    if fa || (!*ro && !ra.stderr.trim().is_empty()) {
                        return Err(fail(FailKind::QuringError, i, format!("quring io failed:\n{}", ra.describe())));
                    }
                    if fb {
                        return Err(fail(FailKind::QemuError, i, format!("qemu-io failed:\n{}", rb.describe())));
                    }
                }
            }
            Segment::Both(c) => {
                let cmds = both_cmds(c);
                let kill = cmds.last().is_some_and(|x| x.starts_with("sigraise"));
                for img in [a, b] {
                    let r = qemu_io_run(img, &cmds, false);
                    let killed = kill && r.signal.is_some();
                    if (killed && (r.stdout.contains("failed") || r.stderr.contains("failed")))
                        || (!killed && io_failed(&r) && !plan.corrupt)
                    {
                        return Err(fail(FailKind::QemuError, i, format!("qemu-io on both copies:\n{}", r.describe())));
                    }
                }
                if kill {
                    // QEMU died with lazy refcounts: both copies are dirty (stale refcounts,
                    // which qemu-img check reports); the next read-write open repairs them.
                    // Only their content is compared here.
                    compare(a, b).map_err(|e| fail(FailKind::Content, i, e))?;
                    raw_data_file_equal(plan, a, b, i)?;
                    continue;
                }
            }
            Segment::Img(args) => {
                let mut v = args.clone();
                v.push(s(a));
                // Snapshot steps on quring's copy go through `quring snapshot`; other
                // qemu-img steps run on both copies.
                let ra = if args.first().is_some_and(|x| x == "snapshot") { quring(&v) } else { qemu_img(&v) };
                let mut v = args.clone();
                v.push(s(b));
                let rb = qemu_img(&v);
                // Both failing alike is QEMU's own limit (a snapshot that narrow refcounts
                // cannot hold); one failing means the copies differ.
                let alike = !ra.success()
                    && !rb.success()
                    && ra.stderr.replace(&s(a), "").replace("quring:", "qemu-img:") == rb.stderr.replace(&s(b), "");
                qemu_failed |= alike;
                if (!ra.success() || !rb.success()) && !alike && !plan.corrupt {
                    return Err(fail(
                        FailKind::QemuError,
                        i,
                        format!("qemu-img on both copies:\n{}\n{}", ra.describe(), rb.describe()),
                    ));
                }
            }
        }
        // A read-only step changed neither copy (a dirty image stays dirty, and is not
        // clean for qemu-img check).
        if matches!(seg, Segment::Io { ro: true, .. }) {
            continue;
        }
        if plan.corrupt {
            if diverged {
                continue;
            }
            if all_ok {
                compare(a, b).map_err(|e| fail(FailKind::Content, i, e))?;
            }
            // In kind: both copies clean, or neither.
            let ca = qemu_img(["check", &s(a)]);
            let cb = qemu_img(["check", &s(b)]);
            if (ca.code == Some(0)) != (cb.code == Some(0)) {
                return Err(fail(
                    FailKind::Check,
                    i,
                    format!("qemu-img check differs in kind:\n{}\n{}", ca.describe(), cb.describe()),
                ));
            }
            let ours = quring(["check", &s(a)]);
            if crashed(&ours) {
                return Err(fail(FailKind::QuringCrash, i, format!("quring check crashed:\n{}", ours.describe())));
            }
        } else {
            compare(a, b).map_err(|e| fail(FailKind::Content, i, e))?;
            checks(a, b, i, qemu_failed)?;
            raw_data_file_equal(plan, a, b, i)?;
        }
    }
    st.space = (disk_usage(a), disk_usage(b));
    if plan.data_file.is_some() {
        st.space.0 += disk_usage(&data_path(a));
        st.space.1 += disk_usage(&data_path(b));
    }
    // Layout is not compared, but quring must not need far more space than QEMU (a zero
    // write that allocates what QEMU deallocates).
    let cs = cluster_size_of(plan);
    if !plan.corrupt && st.space.0 > 2 * st.space.1 + (4 * cs).max(MIB) {
        return Err(fail(
            FailKind::Space,
            st.segments as usize,
            format!("the quring-written copy takes {} bytes on disk, the qemu-written one {}", st.space.0, st.space.1),
        ));
    }
    if !plan.corrupt {
        let last = st.segments as usize;
        let dir = a.parent().unwrap();
        // quring's read path: its whole copy read through the engine (`quring convert`,
        // 2 MiB reads, 8 in flight) must equal what QEMU reads from the other copy.
        let raw = dir.join(format!("read{tag}.raw"));
        let r = quring(["convert", "-O", "raw", &s(a), &s(&raw)]);
        if !r.success() {
            return Err(fail(
                FailKind::Read,
                last,
                format!("quring convert of the quring-written copy:\n{}", r.describe()),
            ));
        }
        let cmp = qemu_img(["compare", "-f", "raw", "-F", "qcow2", &s(&raw), &s(b)]);
        let _ = std::fs::remove_file(&raw);
        if cmp.code != Some(0) {
            return Err(fail(
                FailKind::Read,
                last,
                format!("quring's read of its copy differs from QEMU's read of the other:\n{}", cmp.describe()),
            ));
        }
        for (k, name) in plan.snapshots().iter().enumerate() {
            let sa = dir.join(format!("snap{k}-quring{tag}.qcow2"));
            let sb = dir.join(format!("snap{k}-qemu{tag}.qcow2"));
            copy(a, &sa);
            copy(b, &sb);
            let ra = quring(["snapshot", "-a", name, &s(&sa)]);
            let rb = qemu_img(["snapshot", "-a", name, &s(&sb)]);
            if !ra.success() || !rb.success() {
                // Both refusing alike is QEMU's limit (a revert takes the new references
                // before it drops the old ones, which narrow refcounts may not hold).
                if !ra.success()
                    && !rb.success()
                    && ra.stderr.replace(&s(&sa), "").replace("quring:", "qemu-img:") == rb.stderr.replace(&s(&sb), "")
                {
                    continue;
                }
                return Err(fail(
                    FailKind::Snapshot,
                    last,
                    format!("quring / qemu-img snapshot -a {name}:\n{}\n{}", ra.describe(), rb.describe()),
                ));
            }
            compare(&sa, &sb).map_err(|e| fail(FailKind::Snapshot, last, format!("after snapshot -a {name}: {e}")))?;
            checks(&sa, &sb, last, qemu_failed)
                .map_err(|e| Failure { detail: format!("after snapshot -a {name}: {}", e.detail), ..e })?;
            let _ = std::fs::remove_file(&sa);
            let _ = std::fs::remove_file(&sb);
        }
    }
    Ok(st)
}

/// Builds the plan in a fresh directory and runs it once.
pub fn run_plan(plan: &Plan, opts: &RunOpts) -> Result<Stats, Failure> {
    let d = tempdir();
    let start = build(plan, d.path())?;
    execute(plan, &start, "", opts)
}

/// Greedy shrinking of a failing plan, within `budget`: first the steps (on one built
/// start image), then every file's build actions. A reduction is kept when the plan still
/// fails with the same [`FailKind`].
pub fn minimize(plan: &Plan, kind: FailKind, opts: &RunOpts, budget: Duration) -> Plan {
    let t0 = Instant::now();
    let d = tempdir();
    let mut cur = plan.clone();
    let mut n = 0usize;
    let fails = |p: &Plan, n: &mut usize, start: Option<&Path>| -> bool {
        *n += 1;
        let tag = format!("-m{n}");
        let r = match start {
            Some(st) => execute(p, st, &tag, opts),
            None => {
                let sub = d.path().join(format!("b{n}"));
                std::fs::create_dir(&sub).unwrap();
                let r = build(p, &sub).and_then(|st| execute(p, &st, &tag, opts));
                if r.is_ok() {
                    let _ = std::fs::remove_dir_all(&sub);
                }
                r
            }
        };
        matches!(r, Err(f) if f.kind == kind)
    };
    let Ok(start) = build(&cur, d.path()) else { return cur };
    // Steps: drop runs of decreasing length (a cheap ddmin).
    let mut chunk = (cur.steps.len() / 2).max(1);
    loop {
        let mut i = 0;
        while i < cur.steps.len() && t0.elapsed() < budget {
            let mut t = cur.clone();
            let end = (i + chunk).min(t.steps.len());
            t.steps.drain(i..end);
            if t.ops() > 0 && fails(&t, &mut n, Some(&start)) {
                cur = t;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 || t0.elapsed() >= budget {
            break;
        }
        chunk /= 2;
    }
    // Redundant reopen markers (two in a row, or at either end).
    cur.steps.dedup_by(|a, b| *a == Step::Reopen && *b == Step::Reopen);
    // Build actions, file by file (each attempt rebuilds everything).
    for fi in 0..cur.files.len() {
        let mut i = 0;
        while i < cur.files[fi].actions.len() && t0.elapsed() < budget {
            let mut t = cur.clone();
            t.files[fi].actions.remove(i);
            if fails(&t, &mut n, None) {
                cur = t;
            } else {
                i += 1;
            }
        }
    }
    cur
}

/// Whether a report of [`run_and_report`] is of a plan whose files QEMU's own tools could
/// not build ([`FailKind::Build`]): a gap in the generator, not a finding about quring.
pub fn is_build_failure(report: &str) -> bool {
    report.contains(&format!("({:?} after segment ", FailKind::Build))
}

/// Runs a plan; on failure, returns a full report (minimized if `minimize_budget` is set).
pub fn run_and_report(plan: &Plan, opts: &RunOpts, minimize_budget: Option<Duration>) -> Result<Stats, String> {
    match run_plan(plan, opts) {
        Ok(st) => Ok(st),
        Err(f) => {
            let mut msg = format!(
                "differential failure in {} ({:?} after segment {}):\n  {}\n  {}\n  reproduce:\n{}",
                plan.name,
                f.kind,
                f.segment,
                plan.desc,
                f.detail.replace('\n', "\n  "),
                indent(&plan.script())
            );
            if let Some(b) = minimize_budget
                && f.kind != FailKind::Build
            {
                let m = minimize(plan, f.kind, opts, b);
                let again = run_plan(&m, opts);
                let _ = write!(
                    msg,
                    "\n  minimized ({} of {} steps):\n{}",
                    m.steps.len(),
                    plan.steps.len(),
                    indent(&m.script())
                );
                if let Err(e) = again {
                    let _ = write!(msg, "\n  minimized failure ({:?}): {}", e.kind, e.detail.replace('\n', "\n  "));
                }
            }
            Err(msg)
        }
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// Minimization budget from `QURING_MINIMIZE` (unset: none; `1`: 10 minutes; `N`>1: N
/// seconds).
pub fn minimize_budget_from_env() -> Option<Duration> {
    let v = std::env::var("QURING_MINIMIZE").ok()?;
    match v.parse::<u64>() {
        Ok(1) | Err(_) => Some(Duration::from_secs(600)),
        Ok(0) => None,
        Ok(n) => Some(Duration::from_secs(n)),
    }
}
