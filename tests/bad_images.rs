//! Malformed-image corpus: quring must refuse every case cleanly (non-zero
//! exit, a message naming the problem, no panic, bounded memory), and its
//! `check` must agree with `qemu-img check` wherever QEMU can open the image.

mod common;
#[path = "../fuzz/harness.rs"]
mod harness;

use common::corpus::{BadCase, Must, write_corpus};
use common::*;
use std::path::{Path, PathBuf};

/// Peak RSS allowed for one quring process.
const MAX_RSS_KIB: u64 = 64 * 1024;

/// Generic requirements on any quring run against a bad image.
fn sanity(case: &BadCase, r: &Run, errs: &mut Vec<String>) {
    if r.timed_out {
        errs.push(format!("[{}] timed out:\n{}", case.name, r.describe()));
    }
    if r.code == Some(101) || r.stderr.contains("panicked") {
        errs.push(format!("[{}] panicked:\n{}", case.name, r.describe()));
    }
    if let Some(sig) = r.signal {
        errs.push(format!("[{}] killed by signal {sig}:\n{}", case.name, r.describe()));
    }
    match r.rss_exceeds(MAX_RSS_KIB) {
        Some(false) => {}
        Some(true) => {
            errs.push(format!("[{}] peak RSS {} KiB > {} KiB:\n{}", case.name, r.maxrss_kib, MAX_RSS_KIB, r.describe()))
        }
        None => {
            eprintln!("[{}] warning: RSS limit not verifiable, test process has {} KiB", case.name, r.parent_rss_kib)
        }
    }
    if !r.success() && r.stderr.trim().is_empty() {
        errs.push(format!("[{}] failed without a message on stderr:\n{}", case.name, r.describe()));
    }
}

/// Whether stderr names the problem. File names are removed first: they
/// contain the case name (and random temp-dir characters), which must not
/// count as naming the problem.
fn names_problem(case: &BadCase, r: &Run, paths: &[&str]) -> bool {
    let mut e = r.stderr.clone();
    for p in paths {
        e = e.replace(p, "");
    }
    let e = e.to_lowercase().replace(case.name, "");
    case.expect.iter().any(|w| e.contains(w))
}

fn must_fail(case: &BadCase, what: &str, r: &Run, paths: &[&str], errs: &mut Vec<String>) {
    if r.success() {
        errs.push(format!("[{}] ({}) `{what}` must fail but exited 0:\n{}", case.name, case.what, r.describe()));
    } else if !names_problem(case, r, paths) {
        errs.push(format!(
            "[{}] ({}) `{what}` stderr names none of {:?}:\n{}",
            case.name,
            case.what,
            case.expect,
            r.describe()
        ));
    }
}

/// The corpus is malformed qcow2 images: the tools are told so (`-f qcow2`), as qemu-img
/// would be; without it a file that lost its magic is probed as raw (qemu-img does too).
fn run_case(case: &BadCase, scratch: &Path) -> Vec<String> {
    let mut errs = Vec::new();
    let img = s(&case.path);
    let out = scratch.join(format!("{}.raw", case.name));
    let out_s = s(&out);
    let paths = [img.as_str(), out_s.as_str()];

    let info = quring(["info", "-f", "qcow2", &img]);
    sanity(case, &info, &mut errs);
    if case.info == Must::Fail {
        must_fail(case, "info", &info, &paths, &mut errs);
    }

    let info_json = quring(["info", "-f", "qcow2", "--output=json", &img]);
    sanity(case, &info_json, &mut errs);
    if case.info == Must::Fail {
        must_fail(case, "info --output=json", &info_json, &paths, &mut errs);
    }

    let map = quring(["map", "-f", "qcow2", "--output=json", &img]);
    sanity(case, &map, &mut errs);
    if case.info == Must::Fail {
        must_fail(case, "map", &map, &paths, &mut errs);
    }

    let convert = quring(["convert", "-f", "qcow2", "-O", "raw", &img, &out_s]);
    sanity(case, &convert, &mut errs);
    if case.convert == Must::Fail {
        must_fail(case, "convert -O raw", &convert, &paths, &mut errs);
    }
    let _ = std::fs::remove_file(&out);

    let check = quring(["check", "-f", "qcow2", &img]);
    sanity(case, &check, &mut errs);
    match case.check {
        Must::Fail => {
            must_fail(case, "check", &check, &paths, &mut errs);
            if check.code == Some(0) || check.code == Some(3) {
                errs.push(format!(
                    "[{}] `check` exit {:?}, want 1 or 2 for an image that cannot be opened",
                    case.name, check.code
                ));
            }
        }
        Must::SameAsQemu => {
            let q = qemu_img(["check", &img]);
            assert!(
                matches!(q.code, Some(2) | Some(3)),
                "[{}] corpus bug: qemu-img check should find problems:\n{}",
                case.name,
                q.describe()
            );
            if check.code != q.code {
                errs.push(format!(
                    "[{}] ({}) `check` exit {:?} != qemu-img check exit {:?}:\n{}\n{}",
                    case.name,
                    case.what,
                    check.code,
                    q.code,
                    check.describe(),
                    q.describe()
                ));
            }
        }
        Must::Either => {}
    }
    errs
}

#[test]
fn bad_images_are_refused_cleanly() {
    let dir = tempdir();
    // QURING_CORPUS_DIR=/path also keeps a copy of the corpus there (fuzzer seeds).
    let corpus_dir =
        std::env::var_os("QURING_CORPUS_DIR").map(PathBuf::from).unwrap_or_else(|| dir.path().join("corpus"));
    let corpus = write_corpus(&corpus_dir);
    assert!(corpus.len() >= 35, "corpus has only {} cases", corpus.len());
    let scratch = dir.path().join("out");
    std::fs::create_dir_all(&scratch).unwrap();

    // Two workers: cases are independent and each run spawns a few processes.
    let chunks: Vec<Vec<BadCase>> = {
        let mut v = vec![Vec::new(), Vec::new()];
        for (i, c) in corpus.iter().enumerate() {
            v[i % 2].push(c.clone());
        }
        v
    };
    let errs: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let scratch = &scratch;
                sc.spawn(move || chunk.iter().flat_map(|c| run_case(c, scratch)).collect::<Vec<_>>())
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(errs.is_empty(), "{} problem(s) with malformed images:\n\n{}", errs.len(), errs.join("\n\n"));
}

/// Cross-checks the corpus itself against QEMU: each image whose header
/// problem QEMU also detects is refused by `qemu-img info`, and each image
/// marked "check must agree with qemu" can be opened by QEMU.
#[test]
fn corpus_matches_qemu_expectations() {
    let dir = tempdir();
    let corpus = write_corpus(dir.path());
    let mut errs = Vec::new();
    for c in &corpus {
        let img = s(&c.path);
        let info = qemu_img(["info", &img]);
        let qemu_lenient = QEMU_OPENS.contains(&c.name);
        match c.info {
            Must::Fail if !qemu_lenient && info.success() => errs.push(format!(
                "[{}] qemu-img info accepts an image expected to be refused:\n{}",
                c.name,
                info.describe()
            )),
            Must::Fail if qemu_lenient && !info.success() => errs.push(format!(
                "[{}] listed in QEMU_OPENS but qemu-img info refuses it:\n{}",
                c.name,
                info.describe()
            )),
            _ => {}
        }
        if c.check == Must::SameAsQemu {
            let chk = qemu_img(["check", &img]);
            if !matches!(chk.code, Some(2) | Some(3)) {
                errs.push(format!(
                    "[{}] qemu-img check should report corruption or leaks:\n{}",
                    c.name,
                    chk.describe()
                ));
            }
        }
    }
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}

/// Header-level cases that QEMU 10 nevertheless opens (it reads tables past
/// EOF as zeros, or does not validate the field at open). quring is expected
/// to be stricter here.
const QEMU_OPENS: &[&str] = &[
    // qemu-img probes the format and falls back to raw.
    "empty_file",
    "bad_magic",
    // Opens without a key / data file; only reading data fails.
    "crypt_method_aes",
    "external_data_file_bit",
    // Tables past EOF read as zeros in QEMU.
    "l1_offset_past_eof",
    "refcount_table_offset_past_eof",
    "truncated_to_one_cluster",
    // quring's identity extension: an unknown extension to QEMU, which ignores it.
    "identity_truncated_guid",
    "identity_without_name_hash",
    "identity_nil_guid",
    "identity_huge_backing_length",
    "identity_twice",
    // External data file problems: qemu-img info opens the image without its data (no I/O),
    // so a data file name it cannot open is no error there; quring names the field.
    "data_file_name_empty",
    "data_file_name_nul",
    "data_file_name_not_utf8",
    "data_file_missing",
    "data_file_ext_twice",
    "data_file_raw_without_data_file",
    // A bitmap data cluster past the end of the file reads as zeros in QEMU.
    "bitmap_table_entry_past_eof",
    // qemu-img info lists the bitmap from its directory entry; QEMU reads the table (and
    // would find it past the end of the file or on the directory) only when it loads the
    // bitmap.
    "bitmap_table_past_eof",
    "bitmap_table_is_directory",
];

/// The process runner itself: exit codes, signals, per-child peak RSS.
#[test]
fn runner_reports_status_signal_and_rss() {
    let r = run(std::process::Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
    assert_eq!((r.code, r.signal), (Some(3), None), "{}", r.describe());
    assert_eq!((r.stdout.trim(), r.stderr.trim()), ("out", "err"));
    let r = run(std::process::Command::new("sh").args(["-c", "kill -SEGV $$"]));
    assert_eq!((r.code, r.signal), (None, Some(libc::SIGSEGV)), "{}", r.describe());
    assert_eq!(r.status(), 128 + libc::SIGSEGV);
    let r = qemu_img(["--version"]).ok();
    assert!(r.maxrss_kib > 1024, "implausible maxrss: {}", r.describe());
    // A child using ~100 MiB is measured as such, and a later small child is
    // not charged for it (wait4 is per child, unlike RUSAGE_CHILDREN).
    let big =
        run(std::process::Command::new("sh").args(["-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}"]));
    assert!(big.maxrss_kib > 90 * 1024, "{}", big.describe());
    // ru_maxrss includes the pre-exec copy of this process, but no more.
    let small = run(&mut std::process::Command::new("true"));
    assert!(small.maxrss_kib < (small.parent_rss_kib + 4096).max(16 * 1024), "{}", small.describe());
    assert_eq!(small.rss_exceeds(64 * 1024), Some(false));
    let slow = run_with_timeout(std::process::Command::new("sleep").arg("10"), std::time::Duration::from_millis(200));
    assert!(slow.timed_out && slow.signal == Some(libc::SIGKILL));
}

/// An image the fuzzer found (fuzz/artifacts-regressions/image/oom-check-messages): its
/// L1 and L2 tables are full of garbage, so `check` finds 666,884 problems. The counts must
/// be QEMU's, while memory stays bounded: only the first problem lines are kept and
/// printed, followed by a count of the rest (before, every line was kept, several
/// hundred MiB).
#[test]
fn check_with_many_problems_keeps_memory_bounded() {
    let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/artifacts-regressions/image/oom-check-messages");
    let r = quring(["check", &s(&img)]);
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert_eq!(r.rss_exceeds(MAX_RSS_KIB), Some(false), "peak RSS {} KiB:\n{}", r.maxrss_kib, r.describe());
    let q = qemu_img(["check", &s(&img)]);
    let summary = |out: &str| out.lines().find(|l| l.contains("errors were found")).map(str::to_string);
    assert_eq!(summary(&r.stdout), summary(&q.stdout), "quring:\n{}\nqemu-img:\n{}", r.describe(), q.describe());
    assert!(summary(&r.stdout).is_some(), "{}", r.describe());
    let lines = r.stderr.lines().count();
    // The kept lines, the count of the rest, and why the engine would not open the image.
    assert!(lines <= quring::check::MAX_MESSAGES + 2, "{lines} lines on stderr");
    assert!(r.stderr.contains("more problem lines not shown"), "{}", &r.stderr[r.stderr.len().saturating_sub(500)..]);
}

/// The fuzz target `image` (its own body, fuzz/harness.rs) runs every bitmap-directory case
/// of the corpus without a panic, and the read-only open it starts with refuses each one
/// naming the field: the target reaches the bitmap parser (directory, entries, tables).
/// A valid image with a bitmap goes through the target's export of the bitmap too.
#[test]
fn fuzz_image_target_reaches_the_bitmap_parser() {
    use quring::image::{BackingPolicy, Image, Options};
    let dir = tempdir();
    let corpus = write_corpus(&dir.path().join("corpus"));
    let scratch = dir.path().join("fuzz.qcow2");
    let opts = Options { read_only: true, backing: BackingPolicy::Ignore, ..Default::default() };
    let mut n = 0;
    for c in corpus.iter().filter(|c| c.name.starts_with("bitmap_")) {
        let data = std::fs::read(&c.path).unwrap();
        harness::fuzz_image(&data, &scratch);
        let e = Image::open(&c.path, &opts).err().unwrap_or_else(|| panic!("[{}] opens", c.name));
        let msg = e.to_string().to_lowercase();
        assert!(c.expect.iter().any(|x| msg.contains(x)), "[{}] {msg}", c.name);
        n += 1;
    }
    assert!(n >= 27, "{n} bitmap cases");
    let good = dir.path().join("good.qcow2");
    create_qcow2(&good, &Qcow2Opts::cluster(65536), 1 << 20);
    qemu_img(["bitmap", "--add", "-g", "4096", &s(&good), "b"]).ok();
    qemu_io_cmds(&good, "qcow2", &["write 8k 4k".into()]);
    let img = Image::open(&good, &opts).unwrap();
    assert_eq!(img.dirty_ranges("b").unwrap().len(), 1);
    drop(img);
    harness::fuzz_image(&std::fs::read(&good).unwrap(), &scratch);
}
