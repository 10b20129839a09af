//! Image locking against real QEMU processes: quring's [`ImageLock`] and QEMU's file-posix
//! locks must exclude each other exactly as two QEMU processes do, in both directions.
//!
//! Lock bytes are checked through `/proc/locks`, so the test also pins down which bytes QEMU
//! itself takes for read-write and read-only opens.

mod common;

use common::*;
use quring::Error;
use quring::io::lock::{ImageLock, LockMode};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes QEMU locks for a read-write open of a qcow2 file (and so does `LockMode::ReadWrite`).
const RW_BYTES: [i64; 5] = [100, 101, 103, 201, 203];
/// Bytes QEMU locks for a read-only open (`qemu-io -r`; `LockMode::ReadOnly`).
const RO_BYTES: [i64; 3] = [100, 201, 203];
/// `qemu-io -r -U` (`LockMode::ReadOnly` with force-share).
const RO_SHARE_BYTES: [i64; 1] = [100];

/// A fresh qcow2 image in its own directory.
struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn image() -> Img {
    let dir = tempdir();
    let path = dir.path().join("disk.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", &s(&path), "16M"]).ok();
    Img { _dir: dir, path }
}

/// Every byte offset locked (by anyone) on `path`'s inode according to `/proc/locks`,
/// as `(kind, offset)` with kind "READ"/"WRITE"; only OFD locks are expected.
fn proc_locks(path: &Path) -> BTreeSet<(String, i64)> {
    let md = std::fs::metadata(path).unwrap();
    let id = format!("{:02x}:{:02x}:{}", libc::major(md.dev()), libc::minor(md.dev()), md.ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        // "1: OFDLCK ADVISORY  READ -1 fe:00:10018927 100 101" (blocked waiters start with "->").
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] == "->" || f[5] != id {
            continue;
        }
        assert_eq!(f[1], "OFDLCK", "unexpected lock kind: {line}");
        let start: i64 = f[6].parse().unwrap();
        let end: i64 = if f[7] == "EOF" { start } else { f[7].parse().unwrap() };
        for b in start..=end {
            out.insert((f[3].to_string(), b));
        }
    }
    out
}

fn read_locks(bytes: &[i64]) -> BTreeSet<(String, i64)> {
    bytes.iter().map(|&b| ("READ".to_string(), b)).collect()
}

/// Waits until `/proc/locks` shows exactly `bytes` as read locks on `path`.
#[track_caller]
fn wait_for_locks(path: &Path, bytes: &[i64]) {
    let want = read_locks(bytes);
    let start = Instant::now();
    loop {
        let got = proc_locks(path);
        if got == want {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("locks on {}: got {got:?}, want {want:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A long-running `qemu-io` holding the image open; it reads commands from a pipe and exits
/// at EOF. Killed (by pid) if still running when dropped.
struct QemuHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuHolder {
    fn spawn(path: &Path, extra: &[&str], expect_bytes: &[i64]) -> QemuHolder {
        let mut cmd = Command::new("qemu-io");
        cmd.args(extra).arg(path).env("LC_ALL", "C");
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn qemu-io");
        let stdin = child.stdin.take();
        let holder = QemuHolder { child, stdin };
        wait_for_locks(path, expect_bytes);
        holder
    }

    /// Closes its stdin (qemu-io quits) and waits for it.
    fn stop(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < CHILD_TIMEOUT, "qemu-io did not exit at EOF");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn open_rw(path: &Path) -> File {
    File::options().read(true).write(true).open(path).unwrap()
}

fn open_ro(path: &Path) -> File {
    File::open(path).unwrap()
}

/// The message of a [`Error::Locked`], panicking on success or any other error.
#[track_caller]
fn locked_msg(r: quring::Result<ImageLock>) -> String {
    match r {
        Err(Error::Locked(m)) => m,
        Err(e) => panic!("expected a lock error, got {e:?}"),
        Ok(l) => panic!("expected a lock error, got a lock on {:?}", l.locked_bytes()),
    }
}

#[track_caller]
fn assert_write_conflict(msg: &str, img: &Path) {
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    assert!(msg.contains(&format!("Is another process using the image [{}]?", img.display())), "{msg}");
}

#[track_caller]
fn assert_shared_write_conflict(msg: &str) {
    assert!(msg.contains("Failed to get shared \"write\" lock"), "{msg}");
}

#[track_caller]
fn assert_qemu_fails(run: Run, needle: &str) {
    assert!(!run.success(), "expected failure:\n{}", run.describe());
    assert!(run.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", run.describe());
}

// ---------------------------------------------------------------- QEMU holds, quring asks

#[test]
fn qemu_rw_holder_excludes_quring() {
    let img = image();
    let p = &img.path;
    let holder = QemuHolder::spawn(p, &[], &RW_BYTES);

    let msg = locked_msg(ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false));
    assert_write_conflict(&msg, p);
    // Like `qemu-img info` / `qemu-io -r` without -U.
    let msg = locked_msg(ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false));
    assert_shared_write_conflict(&msg);
    // A failed attempt leaves no locks behind.
    assert_eq!(proc_locks(p), read_locks(&RW_BYTES));

    // -U: read-only force-share succeeds and adds nothing but byte 100 (already held).
    let shared = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, true).unwrap();
    assert_eq!(shared.locked_bytes(), RO_SHARE_BYTES);
    drop(shared);
    // QEMU refuses force-share for writers; so do we.
    assert!(matches!(ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, true), Err(Error::InvalidRequest(_))));

    holder.stop();
    assert!(proc_locks(p).is_empty());
    let lock = ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false).unwrap();
    assert_eq!(lock.locked_bytes(), RW_BYTES);
}

#[test]
fn qemu_ro_holder_admits_readers_only() {
    let img = image();
    let p = &img.path;
    let holder = QemuHolder::spawn(p, &["-r"], &RO_BYTES);

    let msg = locked_msg(ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false));
    assert_write_conflict(&msg, p);
    let reader = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RO_BYTES));
    let shared = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, true).unwrap();
    drop((reader, shared));
    holder.stop();
}

#[test]
fn qemu_force_share_holder_does_not_block_quring_writer() {
    let img = image();
    let p = &img.path;
    let holder = QemuHolder::spawn(p, &["-r", "-U"], &RO_SHARE_BYTES);
    let lock = ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RW_BYTES));
    drop(lock);
    holder.stop();
}

// ---------------------------------------------------------------- quring holds, QEMU asks

#[test]
fn quring_rw_lock_excludes_qemu() {
    let img = image();
    let p = &img.path;
    let ps = s(p);
    let lock = ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RW_BYTES));

    assert_qemu_fails(qemu_img(["info", &ps]), "Failed to get shared \"write\" lock");
    qemu_img(["info", "-U", &ps]).ok();
    assert_qemu_fails(qemu_io(["-c", "read 0 512", &ps]), "Failed to get \"write\" lock");
    assert_qemu_fails(qemu_io(["-r", "-c", "read 0 512", &ps]), "Failed to get shared \"write\" lock");
    qemu_io(["-r", "-U", "-c", "read 0 512", &ps]).ok();
    // QEMU's failed attempts leave only our locks.
    assert_eq!(proc_locks(p), read_locks(&RW_BYTES));

    drop(lock);
    assert!(proc_locks(p).is_empty());
    qemu_io(["-c", "write 0 512", &ps]).ok();
}

#[test]
fn quring_ro_lock_admits_qemu_readers_only() {
    let img = image();
    let p = &img.path;
    let ps = s(p);
    let lock = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RO_BYTES));

    qemu_img(["info", &ps]).ok();
    qemu_io(["-r", "-c", "read 0 512", &ps]).ok();
    assert_qemu_fails(qemu_io(["-c", "read 0 512", &ps]), "Failed to get \"write\" lock");
    qemu_io(["-r", "-U", "-c", "read 0 512", &ps]).ok();
    drop(lock);
    qemu_io(["-c", "write 0 512", &ps]).ok();
}

#[test]
fn quring_force_share_lock_blocks_nobody() {
    let img = image();
    let p = &img.path;
    let ps = s(p);
    let lock = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, true).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RO_SHARE_BYTES));
    qemu_img(["info", &ps]).ok();
    qemu_io(["-c", "write 0 512", &ps]).ok();
    drop(lock);
}

// ---------------------------------------------------------------- within one process

#[test]
fn two_writers_in_one_process_conflict() {
    let img = image();
    let p = &img.path;
    let (f1, f2) = (open_rw(p), open_rw(p));
    let first = ImageLock::acquire(&f1, p, LockMode::ReadWrite, false).unwrap();
    let msg = locked_msg(ImageLock::acquire(&f2, p, LockMode::ReadWrite, false));
    assert_write_conflict(&msg, p);
    let msg = locked_msg(ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false));
    assert_shared_write_conflict(&msg);
    drop(first);
    let second = ImageLock::acquire(&f2, p, LockMode::ReadWrite, false).unwrap();
    assert_eq!(proc_locks(p), read_locks(&RW_BYTES));
    drop(second);
}

#[test]
fn two_readers_in_one_process_coexist() {
    let img = image();
    let p = &img.path;
    let a = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false).unwrap();
    let b = ImageLock::acquire(&open_ro(p), p, LockMode::ReadOnly, false).unwrap();
    let msg = locked_msg(ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false));
    assert_write_conflict(&msg, p);
    drop((a, b));
    assert!(proc_locks(p).is_empty());
}

#[test]
fn lock_outlives_the_callers_fd_and_drop_releases_it() {
    let img = image();
    let p = &img.path;
    let ps = s(p);
    // The caller's File is closed right away; the lock keeps its own dup.
    let lock = ImageLock::acquire(&open_rw(p), p, LockMode::ReadWrite, false).unwrap();
    assert_qemu_fails(qemu_img(["info", &ps]), "Failed to get shared \"write\" lock");
    drop(lock);
    qemu_img(["info", &ps]).ok();

    // Dropping the lock releases it even while the caller keeps the same description open.
    let f = open_rw(p);
    let lock = ImageLock::acquire(&f, p, LockMode::ReadWrite, false).unwrap();
    drop(lock);
    assert!(proc_locks(p).is_empty());
    qemu_io(["-c", "write 0 512", &ps]).ok();
    drop(f);
}
