//! The tools never wipe a file qemu-img refuses to touch (issue 12, section 3). Each test
//! runs a `quring convert` or `quring create` whose output is the input itself, a file of
//! the input's backing chain, an image another process (qemu-io) has open, or the new
//! image's own backing file, and checks that
//! - it fails with exit 1, without a panic or a signal;
//! - stderr carries qemu-img's words, and where qemu-img refuses too, exactly qemu-img's
//!   message (with `quring:` for `qemu-img:`), run here on the same files;
//! - the file is byte-identical afterwards (qemu-img takes the write lock and checks
//!   identity before it truncates; so does quring).
//!
//! Commands run inside the test directory with relative names, as a user would type them,
//! so that the messages (which quote the names) compare as they are.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory with `x.qcow2` (16 MiB, 1 MiB of data), `base.qcow2` (data) and
/// `top.qcow2` over it.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempdir();
        let d = Dir { dir };
        build_qcow2(&d.p("x.qcow2"), &Qcow2Opts::default(), 16 * MIB, &["write -P 0x5a 0 1M".into()]);
        build_qcow2(&d.p("base.qcow2"), &Qcow2Opts::default(), 16 * MIB, &["write -P 0x11 1M 64k".into()]);
        let top = Qcow2Opts { backing: Some(("base.qcow2".into(), "qcow2".into())), ..Default::default() };
        build_qcow2(&d.p("top.qcow2"), &top, 16 * MIB, &["write -P 0x22 2M 64k".into()]);
        d
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn quring(&self, args: &[&str]) -> Run {
        quring_in(self.dir.path(), args)
    }

    fn qemu_img(&self, args: &[&str]) -> Run {
        run_in(self.dir.path(), "qemu-img", args)
    }
}

const MIB: u64 = 1 << 20;

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A failure as qemu-img fails: exit 1, no panic (101) and no signal.
#[track_caller]
fn assert_refused(r: &Run) {
    assert_eq!(r.code, Some(1), "expected exit 1:\n{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "panic:\n{}", r.describe());
}

/// `path` is still `before`, byte for byte.
#[track_caller]
fn assert_untouched(path: &Path, before: &[u8], what: &str) {
    let after = bytes(path);
    assert!(
        after.len() == before.len() && after == before,
        "{what} changed {} ({} -> {} bytes)",
        path.display(),
        before.len(),
        after.len()
    );
}

/// quring's stderr is qemu-img's, with `quring:` where qemu-img says `qemu-img:`.
#[track_caller]
fn assert_same_message(quring: &Run, qemu: &Run) {
    assert!(!qemu.success(), "qemu-img did not refuse either:\n{}", qemu.describe());
    let want = qemu.stderr.replace("qemu-img:", "quring:");
    assert_eq!(
        quring.stderr,
        want,
        "quring's message differs from qemu-img's:\n{}\n{}",
        quring.describe(),
        qemu.describe()
    );
}

/// Runs `args` with quring and then with qemu-img on the same files, requiring the same
/// refusal and `path` unchanged by either.
#[track_caller]
fn refused_like_qemu_img(d: &Dir, args: &[&str], path: &str) {
    let p = d.p(path);
    let before = bytes(&p);
    let r = d.quring(args);
    assert_refused(&r);
    assert_untouched(&p, &before, &format!("quring {}", args.join(" ")));
    let q = d.qemu_img(args);
    assert_untouched(&p, &before, &format!("qemu-img {}", args.join(" ")));
    assert_same_message(&r, &q);
}

#[test]
fn convert_raw_onto_its_input_is_refused() {
    let d = Dir::new();
    refused_like_qemu_img(&d, &["convert", "-O", "raw", "x.qcow2", "x.qcow2"], "x.qcow2");
}

#[test]
fn convert_qcow2_onto_its_input_is_refused() {
    let d = Dir::new();
    refused_like_qemu_img(&d, &["convert", "-O", "qcow2", "x.qcow2", "x.qcow2"], "x.qcow2");
}

#[test]
fn convert_onto_a_hard_link_of_its_input_is_refused() {
    let d = Dir::new();
    std::fs::hard_link(d.p("x.qcow2"), d.p("link.qcow2")).unwrap();
    refused_like_qemu_img(&d, &["convert", "-O", "raw", "x.qcow2", "link.qcow2"], "x.qcow2");
}

#[test]
fn convert_onto_the_backing_file_is_refused() {
    let d = Dir::new();
    refused_like_qemu_img(&d, &["convert", "-O", "raw", "top.qcow2", "base.qcow2"], "base.qcow2");
    refused_like_qemu_img(&d, &["convert", "-O", "qcow2", "top.qcow2", "base.qcow2"], "base.qcow2");
}

#[test]
fn convert_onto_a_raw_backing_file_is_refused() {
    // quring does not lock raw backing files; the identity check still sees it.
    let d = Dir::new();
    build_raw(&d.p("base.raw"), 16 * MIB, &["write -P 0x33 0 64k".into()]);
    let o = Qcow2Opts { backing: Some(("base.raw".into(), "raw".into())), ..Default::default() };
    build_qcow2(&d.p("over.qcow2"), &o, 16 * MIB, &[]);
    refused_like_qemu_img(&d, &["convert", "-O", "raw", "over.qcow2", "base.raw"], "base.raw");
}

#[test]
fn convert_with_force_share_still_refuses_its_input() {
    // qemu-img -U overwrites its own input here; quring refuses, in its own words.
    let d = Dir::new();
    for (args, path) in [
        (["convert", "-U", "-O", "raw", "x.qcow2", "x.qcow2"], "x.qcow2"),
        (["convert", "-U", "-O", "qcow2", "top.qcow2", "base.qcow2"], "base.qcow2"),
    ] {
        let before = bytes(&d.p(path));
        let r = d.quring(&args);
        assert_refused(&r);
        assert!(r.stderr.contains("refusing to overwrite it (even with -U)"), "{}", r.describe());
        assert!(r.stderr.contains(&format!("quring: {path}: error while converting")), "{}", r.describe());
        assert_untouched(&d.p(path), &before, &args.join(" "));
    }
}

/// `qemu-io IMG` reading commands from a pipe: holds QEMU's read-write locks on the image
/// until its stdin closes.
struct QemuIoHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuIoHolder {
    fn spawn(path: &Path) -> QemuIoHolder {
        let mut child = Command::new("qemu-io")
            .arg(path)
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take();
        let h = QemuIoHolder { child, stdin };
        // Wait for its write lock (byte 101 of QEMU's protocol) in /proc/locks.
        let ino = std::fs::metadata(path).unwrap().ino();
        let start = Instant::now();
        // "1: OFDLCK ADVISORY  READ -1 fe:00:10018927 100 101": a range of bytes.
        let holds_101 = |l: &str| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let range =
                |a: &str, b: &str| Some((a.parse::<u64>().ok()?, if b == "EOF" { u64::MAX } else { b.parse().ok()? }));
            f.len() >= 8
                && f[5].rsplit(':').next() == Some(ino.to_string().as_str())
                && range(f[6], f[7]).is_some_and(|(a, b)| (a..=b).contains(&101))
        };
        while !std::fs::read_to_string("/proc/locks").unwrap().lines().any(holds_101) {
            assert!(start.elapsed() < Duration::from_secs(20), "qemu-io did not lock {}", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            let start = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn convert_raw_onto_an_image_in_use_is_refused() {
    let d = Dir::new();
    build_qcow2(&d.p("vm.qcow2"), &Qcow2Opts::default(), 16 * MIB, &["write -P 0x77 0 64k".into()]);
    let _vm = QemuIoHolder::spawn(&d.p("vm.qcow2"));
    refused_like_qemu_img(&d, &["convert", "-O", "raw", "x.qcow2", "vm.qcow2"], "vm.qcow2");
}

#[test]
fn convert_qcow2_onto_an_image_in_use_is_refused() {
    let d = Dir::new();
    build_qcow2(&d.p("vm.qcow2"), &Qcow2Opts::default(), 16 * MIB, &["write -P 0x77 0 64k".into()]);
    let _vm = QemuIoHolder::spawn(&d.p("vm.qcow2"));
    refused_like_qemu_img(&d, &["convert", "-O", "qcow2", "x.qcow2", "vm.qcow2"], "vm.qcow2");
}

#[test]
fn create_over_an_image_in_use_is_refused() {
    let d = Dir::new();
    build_qcow2(&d.p("vm.qcow2"), &Qcow2Opts::default(), 16 * MIB, &["write -P 0x77 0 64k".into()]);
    let _vm = QemuIoHolder::spawn(&d.p("vm.qcow2"));
    // Both print the "Formatting" line on stdout first, then refuse.
    refused_like_qemu_img(&d, &["create", "-f", "qcow2", "vm.qcow2", "16M"], "vm.qcow2");
    refused_like_qemu_img(&d, &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "vm.qcow2"], "vm.qcow2");
}

#[test]
fn create_with_itself_as_backing_file_is_refused() {
    let d = Dir::new();
    std::fs::copy(d.p("x.qcow2"), d.p("self.qcow2")).unwrap();
    refused_like_qemu_img(
        &d,
        &["create", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", "self.qcow2"],
        "self.qcow2",
    );
    refused_like_qemu_img(
        &d,
        &["create", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", "self.qcow2", "16M"],
        "self.qcow2",
    );
    // Spelled differently (qemu-img compares names only, and here fails on its own).
    for args in [
        &["create", "-f", "qcow2", "-b", "./self.qcow2", "-F", "qcow2", "self.qcow2", "16M"][..],
        &["create", "-u", "-b", "self.qcow2", "-F", "qcow2", "./self.qcow2", "16M"],
    ] {
        let before = bytes(&d.p("self.qcow2"));
        let r = d.quring(args);
        assert_refused(&r);
        assert!(
            r.stderr.contains("Error: Trying to create an image with the same filename as the backing file"),
            "{}",
            r.describe()
        );
        assert_untouched(&d.p("self.qcow2"), &before, &args.join(" "));
    }
    // A new file that would name itself is not created either.
    let r = d.quring(&["create", "-f", "qcow2", "-u", "-b", "new.qcow2", "-F", "qcow2", "new.qcow2", "16M"]);
    assert_refused(&r);
    assert!(!d.p("new.qcow2").exists(), "new.qcow2 was created");
}

#[test]
fn create_over_a_file_of_its_backing_chain_is_refused() {
    // base.qcow2 backs top.qcow2: `create -b top.qcow2 base.qcow2` would make a loop.
    // (qemu-img 10 accepts it, then loops opening the chain.)
    let d = Dir::new();
    let before = bytes(&d.p("base.qcow2"));
    let r = d.quring(&["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2"]);
    assert_refused(&r);
    assert!(
        r.stderr.contains("quring: base.qcow2: Error: Trying to create an image over a file of its own backing chain"),
        "{}",
        r.describe()
    );
    assert_untouched(&d.p("base.qcow2"), &before, "create -b top.qcow2 base.qcow2");
}

#[test]
fn ordinary_outputs_still_work() {
    // The checks refuse only what they should: new files, and replacing an unrelated file.
    let d = Dir::new();
    std::fs::write(d.p("old.raw"), b"unrelated").unwrap();
    for (args, out) in [
        (vec!["convert", "-O", "raw", "top.qcow2", "new.raw"], "new.raw"),
        (vec!["convert", "-O", "raw", "top.qcow2", "old.raw"], "old.raw"),
        (vec!["convert", "-O", "qcow2", "top.qcow2", "new.qcow2"], "new.qcow2"),
        (vec!["convert", "-O", "qcow2", "top.qcow2", "old.raw"], "old.raw"),
    ] {
        d.quring(&args).ok();
        let fmt = if out.ends_with("qcow2") || args[2] == "qcow2" { "qcow2" } else { "raw" };
        d.qemu_img(&["compare", "-q", "-F", fmt, "top.qcow2", out]).ok();
    }
    d.quring(&["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "x.qcow2"]).ok();
    d.qemu_img(&["compare", "-q", "top.qcow2", "x.qcow2"]).ok();
}
