//! Shared helpers for quring's integration tests.
//!
//! Every test binary includes this module with `mod common;`, so not every
//! helper is used by every binary.
#![allow(dead_code)]

pub mod bitmap_ops;
pub mod corpus;
mod rng;

#[allow(unused_imports)]
pub use rng::Rng;

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wall-clock limit for any single child process.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Result of running a child process to completion.
#[derive(Debug, Clone)]
pub struct Run {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` if the child was killed by a signal (or timed out).
    pub code: Option<i32>,
    /// Terminating signal, if any.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident set size of this child in KiB (`ru_maxrss` from
    /// `wait4`). Linux folds the RSS of the pre-`exec` copy of the parent
    /// into this value, so it is really max(child peak, ~parent RSS at
    /// spawn); see [`Run::rss_exceeds`].
    pub maxrss_kib: u64,
    /// This (test) process's VmRSS in KiB just before spawning the child.
    pub parent_rss_kib: u64,
    pub timed_out: bool,
}

impl Run {
    /// Exit code, with signals mapped to `128 + signal` the way shells do.
    pub fn status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }

    /// `Some(true)` if the child's own peak RSS certainly exceeded
    /// `limit_kib`, `Some(false)` if it certainly did not, `None` if the
    /// measurement is inconclusive because the test process itself was
    /// at least that large when it forked the child.
    pub fn rss_exceeds(&self, limit_kib: u64) -> Option<bool> {
        if self.maxrss_kib <= limit_kib {
            Some(false)
        } else if self.parent_rss_kib < limit_kib {
            Some(true)
        } else {
            None
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics (with the full command line and output) unless the exit code is 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        if !self.success() {
            panic!("command failed:\n{}", self.describe());
        }
        self
    }

    /// Multi-line description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "  $ {}\n  exit: {:?} signal: {:?} timed_out: {} maxrss: {} KiB (parent {} KiB)\n  stdout: {}\n  stderr: {}",
            self.cmdline,
            self.code,
            self.signal,
            self.timed_out,
            self.maxrss_kib,
            self.parent_rss_kib,
            truncate_for_msg(&self.stdout),
            truncate_for_msg(&self.stderr),
        )
    }

    /// Parses stdout as JSON, panicking with context on failure.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!("stdout is not valid JSON ({e}):\n{}", self.describe()),
        }
    }
}

fn truncate_for_msg(s: &str) -> String {
    const MAX: usize = 4000;
    if s.len() <= MAX {
        s.trim_end().to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... [{} bytes total]", &s[..end], s.len())
    }
}

fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./,:+@%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Renders a command as a shell-like string.
pub fn cmdline(cmd: &Command) -> String {
    let mut parts = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        parts.push(format!("(cd {} &&", shell_quote(dir.as_os_str())));
    }
    parts.push(shell_quote(cmd.get_program()));
    for a in cmd.get_args() {
        parts.push(shell_quote(a));
    }
    let mut s = parts.join(" ");
    if cmd.get_current_dir().is_some() {
        s.push(')');
    }
    s
}

/// Runs `cmd` to completion, capturing stdout, stderr, exit status and the
/// child's own peak RSS (via `wait4`, so it is per child, not a max over all
/// children). Kills the child after [`CHILD_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Run {
    run_with_timeout(cmd, CHILD_TIMEOUT)
}

pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Run {
    let line = cmdline(cmd);
    // No core dumps from crashing children (quring under test, or qemu-io's
    // `abort` command used to leave images dirty).
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the hook.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let parent_rss_kib = self_rss_kib();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });

    let start = Instant::now();
    let mut timed_out = false;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own unwaited child; pointers are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("wait4 on `{line}` failed: {e}");
        }
        if !timed_out && start.elapsed() > timeout {
            timed_out = true;
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The child has been reaped by wait4; `child` must not be waited on again.
    drop(child);
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Run {
        cmdline: line,
        code,
        signal,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        maxrss_kib: usage.ru_maxrss.max(0) as u64,
        parent_rss_kib,
        timed_out,
    }
}

/// VmRSS of the current process in KiB (0 if unknown).
pub fn self_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn command<I, S>(prog: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(prog);
    c.args(args);
    // Keep QEMU's and our own messages in a predictable language.
    c.env("LC_ALL", "C");
    c
}

/// Path of the quring binary under test: `$QURING_BIN` if set (e.g. a shim
/// that forwards to qemu-img/qemu-io, to validate the tests themselves),
/// otherwise the binary cargo built.
pub fn quring_bin() -> String {
    if let Ok(p) = std::env::var("QURING_BIN") {
        return p;
    }
    let p = build_dir().join("quring");
    assert!(p.exists(), "{} not found: run `cargo build --workspace` first (scripts/test.sh does)", p.display());
    p.display().to_string()
}

/// The target directory of the profile these tests were built with (the test executable
/// lives in its `deps/`): the `quring` binary and the fio plugin of the same build are there.
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

pub fn qemu_img<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command("qemu-img", args))
}

pub fn qemu_io<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command("qemu-io", args))
}

pub fn quring<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command(quring_bin(), args))
}

/// Runs `prog args` with `cwd` as the working directory.
pub fn run_in<I, S>(cwd: &Path, prog: impl AsRef<OsStr>, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = command(prog, args);
    c.current_dir(cwd);
    run(&mut c)
}

pub fn quring_in<I, S>(cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_in(cwd, quring_bin(), args)
}

/// Runs the same arguments through qemu-img and quring in `dir` and compares exit code,
/// stdout and stderr (with `quring` read as `qemu-img`).
#[track_caller]
pub fn same_as_qemu_img(dir: &Path, args: &[&str]) {
    let q = run_in(dir, "qemu-img", args);
    let ours = quring_in(dir, args);
    let cmd = args.join(" ");
    assert_eq!(ours.status(), q.status(), "exit code of {cmd}:\n{}\n{}", q.describe(), ours.describe());
    assert_eq!(ours.stdout, q.stdout, "stdout of {cmd}");
    assert_eq!(ours.stderr.replace("quring", "qemu-img"), q.stderr, "stderr of {cmd}");
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("quring-test-").tempdir().expect("create temp dir")
}

/// Converts a path to a `String` argument.
pub fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

// ---------------------------------------------------------------------------
// Deterministic data

/// splitmix64 step.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` pseudo-random bytes determined by `seed`.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut st = seed ^ 0x5155_5249_4e47; // "QURING"
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&splitmix64(&mut st).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The `i`-th of a sequence of distinct, non-zero one-byte patterns for
/// `write -P` (cycles after 255 values).
pub fn pattern_byte(i: usize) -> u8 {
    // 0x?? values that are never 0x00 and differ between neighbours.
    (((i * 37 + 0x11) % 255) + 1) as u8
}

/// Writes a file of `len` pseudo-random bytes (for `qemu-io write -s FILE`).
pub fn write_pattern_file(path: &Path, seed: u64, len: usize) {
    std::fs::write(path, pattern_bytes(seed, len)).expect("write pattern file");
}

// ---------------------------------------------------------------------------
// Image construction

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    V010,
    V11,
}

impl Compat {
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V010 => "0.10",
            Compat::V11 => "1.1",
        }
    }
}

/// Parameters for `qemu-img create -f qcow2`.
#[derive(Debug, Clone)]
pub struct Qcow2Opts {
    pub cluster_size: u32,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    pub compat: Compat,
    /// `zlib` or `zstd`; `None` leaves QEMU's default (zlib).
    pub compression_type: Option<&'static str>,
    pub lazy_refcounts: bool,
    /// `off`, `metadata`, `falloc`, `full`.
    pub preallocation: Option<&'static str>,
    /// (backing file name as stored in the header, backing format)
    pub backing: Option<(String, String)>,
    /// External data file: (file name, created next to the image and stored as an absolute
    /// path, since QEMU opens relative names from the current directory; data_file_raw).
    pub data_file: Option<(&'static str, bool)>,
}

impl Default for Qcow2Opts {
    fn default() -> Self {
        Qcow2Opts {
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            compat: Compat::V11,
            compression_type: None,
            lazy_refcounts: false,
            preallocation: None,
            backing: None,
            data_file: None,
        }
    }
}

impl Qcow2Opts {
    pub fn cluster(cluster_size: u32) -> Self {
        Qcow2Opts { cluster_size, ..Default::default() }
    }

    /// The `-o` option string for `qemu-img create` (without backing options).
    pub fn create_options(&self) -> String {
        let mut o = vec![
            format!("cluster_size={}", self.cluster_size),
            format!("refcount_bits={}", self.refcount_bits),
            format!("compat={}", self.compat.as_str()),
        ];
        if self.compat == Compat::V11 {
            o.push(format!("extended_l2={}", if self.extended_l2 { "on" } else { "off" }));
            o.push(format!("lazy_refcounts={}", if self.lazy_refcounts { "on" } else { "off" }));
            if let Some(ct) = self.compression_type {
                o.push(format!("compression_type={ct}"));
            }
        }
        if let Some(p) = self.preallocation {
            o.push(format!("preallocation={p}"));
        }
        o.join(",")
    }
}

/// `qemu-img create -f qcow2 -o OPTS [-b B -F F] path size`.
#[track_caller]
pub fn create_qcow2(path: &Path, opts: &Qcow2Opts, size: u64) {
    let mut o = opts.create_options();
    if let Some((name, raw)) = opts.data_file {
        let dir = std::path::absolute(path).expect("absolute path").parent().expect("image directory").to_path_buf();
        o += &format!(",data_file={},data_file_raw={}", s(&dir.join(name)), if raw { "on" } else { "off" });
    }
    let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), "qcow2".into(), "-o".into(), o];
    if let Some((b, f)) = &opts.backing {
        args.extend(["-b".into(), b.clone(), "-F".into(), f.clone()]);
    }
    args.push(s(path));
    args.push(size.to_string());
    qemu_img(&args).ok();
}

/// Runs a batch of qemu-io commands (`-c CMD` each) on an image in one
/// process. `fmt` is `qcow2` or `raw`.
#[track_caller]
pub fn qemu_io_cmds(path: &Path, fmt: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(path));
    let r = qemu_io(&args).ok();
    // qemu-io reports some command failures only on stdout with exit 0.
    for bad in ["failed", "Error", "error:"] {
        assert!(!r.stdout.contains(bad) && !r.stderr.contains(bad), "qemu-io reported an error:\n{}", r.describe());
    }
}

/// Builds a qcow2 test image with qemu-img/qemu-io: create with `opts`, then
/// run `cmds` (qemu-io syntax) on it.
#[track_caller]
pub fn build_qcow2(path: &Path, opts: &Qcow2Opts, size: u64, cmds: &[String]) {
    create_qcow2(path, opts, size);
    qemu_io_cmds(path, "qcow2", cmds);
}

/// Creates a raw image of `size` bytes and runs `cmds` on it.
#[track_caller]
pub fn build_raw(path: &Path, size: u64, cmds: &[String]) {
    qemu_img(["create", "-q", "-f", "raw", &s(path), &size.to_string()]).ok();
    qemu_io_cmds(path, "raw", cmds);
}

// ---------------------------------------------------------------------------
// Comparison

/// First byte offset where the two files differ (a length mismatch counts as
/// a difference at the shorter length), or `None` if identical.
pub fn first_difference(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    let mut fa = File::open(a)?;
    let mut fb = File::open(b)?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let common = la.min(lb);
    while pos < common {
        let n = ((common - pos) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y);
            return Ok(Some(pos + i.unwrap_or(0) as u64));
        }
        pos += n as u64;
    }
    Ok(if la != lb { Some(common) } else { None })
}

/// True when both files exist and have identical contents.
pub fn raw_bytes_equal(a: &Path, b: &Path) -> bool {
    matches!(first_difference(a, b), Ok(None))
}

// ---------------------------------------------------------------------------
// Byte patching

#[track_caller]
pub fn patch_bytes(path: &Path, off: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for patching: {e}", path.display()));
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

#[track_caller]
pub fn patch_u8(path: &Path, off: u64, v: u8) {
    patch_bytes(path, off, &[v]);
}

#[track_caller]
pub fn patch_be16(path: &Path, off: u64, v: u16) {
    patch_bytes(path, off, &v.to_be_bytes());
}

#[track_caller]
pub fn patch_be32(path: &Path, off: u64, v: u32) {
    patch_bytes(path, off, &v.to_be_bytes());
}

#[track_caller]
pub fn patch_be64(path: &Path, off: u64, v: u64) {
    patch_bytes(path, off, &v.to_be_bytes());
}

#[track_caller]
pub fn read_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap_or_else(|e| panic!("read {}@{off}+{len}: {e}", path.display()));
    v
}

#[track_caller]
pub fn read_be16(path: &Path, off: u64) -> u16 {
    u16::from_be_bytes(read_bytes(path, off, 2).try_into().unwrap())
}

#[track_caller]
pub fn read_be32(path: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_bytes(path, off, 4).try_into().unwrap())
}

#[track_caller]
pub fn read_be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_bytes(path, off, 8).try_into().unwrap())
}

#[track_caller]
pub fn truncate_file(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Hex dump in `xxd` style, for debugging patches.
pub fn hexdump(path: &Path, off: u64, len: usize) -> String {
    let data = read_bytes(path, off, len);
    let mut out = String::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}: ", off + 16 * i as u64));
        for b in chunk {
            out.push_str(&format!("{b:02x} "));
        }
        out.push_str(&" ".repeat(3 * (16 - chunk.len())));
        for &b in chunk {
            out.push(if b.is_ascii_graphic() { b as char } else { '.' });
        }
        out.push('\n');
    }
    out
}

/// The fio plugin built by `cargo build --workspace` with the same profile as the tests
/// (`QURING_FIO` overrides).
pub fn fio_plugin() -> PathBuf {
    if let Ok(p) = std::env::var("QURING_FIO") {
        return PathBuf::from(p);
    }
    let p = build_dir().join("libquring_fio.so");
    assert!(p.exists(), "{} not found: run `cargo build --workspace` first (scripts/test.sh does)", p.display());
    p
}

/// Joins a directory and file name.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Like [`quring`], with a custom wall-clock limit (a hung writer should not
/// hold a test for the full [`CHILD_TIMEOUT`]).
pub fn quring_with_timeout<I, S>(args: I, timeout: Duration) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_timeout(&mut command(quring_bin(), args), timeout)
}
