//! User input that used to crash the tools or exhaust memory (issue 12, section 4). Every
//! length, size and count from a command line or an option is bounded before anything is
//! allocated: `quring io` lengths as qemu-io bounds them (the numbers and messages are
//! checked against qemu-io itself), cache sizes capped at what the image can use as QEMU
//! does (in `Image::open`, so the tools and the fio plugin share it), pattern bytes
//! validated. Each test checks the exit status (1, no panic, no signal), the message, the
//! image bytes, and the peak RSS of the process.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Peak RSS allowed for a tool run on the 16 MiB test image.
const RSS_KIB: u64 = 64 * 1024;

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("x.qcow2");
    build_qcow2(&p, &Qcow2Opts::default(), 16 * MIB, &["write -P 0x5a 0 1M".into()]);
    p
}

/// Exit 1 (qemu-io's status for a refused command), no panic, no signal, bounded memory.
#[track_caller]
fn assert_clean_failure(r: &Run) {
    assert_eq!(r.code, Some(1), "expected exit 1:\n{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "panic:\n{}", r.describe());
    assert_small(r);
}

#[track_caller]
fn assert_small(r: &Run) {
    assert_eq!(r.rss_exceeds(RSS_KIB), Some(false), "peak RSS {} KiB:\n{}", r.maxrss_kib, r.describe());
}

/// `quring io -c CMD` is refused with qemu-io's own message for CMD (qemu-io prints it on
/// stdout, as quring's), leaving the image as it was.
#[track_caller]
fn refused_like_qemu_io(cmd: &str, message: &str) {
    let d = tempdir();
    let p = image(d.path());
    let before = std::fs::read(&p).unwrap();
    let q = qemu_io(["-c", cmd, &s(&p)]);
    assert!(q.stdout.contains(message), "qemu-io no longer says {message:?} for {cmd:?}:\n{}", q.describe());
    let r = quring(["io", "-c", cmd, &s(&p)]);
    assert_clean_failure(&r);
    assert_eq!(r.stdout.trim_end(), message, "quring io -c '{cmd}':\n{}", r.describe());
    assert!(std::fs::read(&p).unwrap() == before, "quring io -c '{cmd}' changed the image");
}

#[test]
fn read_of_8_exbibytes_is_a_parse_error() {
    refused_like_qemu_io("read 0 8E", "Parsing error: argument too large -- 8E");
}

#[test]
fn write_of_8_exbibytes_is_a_parse_error() {
    refused_like_qemu_io("write -P 1 0 8E", "Parsing error: argument too large -- 8E");
}

#[test]
fn read_of_u64_max_bytes_is_a_parse_error() {
    refused_like_qemu_io("read 0 18446744073709551615", "Parsing error: argument too large -- 18446744073709551615");
}

#[test]
fn read_of_64_gibibytes_exceeds_the_request_limit() {
    refused_like_qemu_io("read 0 64G", "length cannot exceed 2147483136, given 64G");
}

#[test]
fn read_of_3_gibibytes_exceeds_the_request_limit() {
    refused_like_qemu_io("read 0 3G", "length cannot exceed 2147483136, given 3G");
    refused_like_qemu_io("discard 0 3G", "length cannot exceed 2147483136, given 3G");
    refused_like_qemu_io("write -z 0 3G", "length cannot exceed 2147483136 without -n, given 3G");
}

#[test]
fn longest_request_past_the_end_allocates_nothing() {
    // qemu-io allocates the 2 GiB buffer before it finds the range past the end; quring
    // checks the range first.
    let d = tempdir();
    let p = image(d.path());
    for cmd in ["read 0 2147483136", "write -P 1 0 2147483136", "read 9223372036854775807 2147483136", "read 17M 0"] {
        let r = quring(["io", "-c", cmd, &s(&p)]);
        assert_clean_failure(&r);
        assert!(r.stderr.contains("past the end"), "quring io -c '{cmd}':\n{}", r.describe());
    }
    // A whole-disk read is fine, and costs the disk's size.
    let r = quring(["io", "-c", "read -P 0 1M 15M", &s(&p)]).ok();
    assert_small(&r);
}

#[test]
fn pattern_256_is_not_a_byte() {
    refused_like_qemu_io("write -P 256 0 512", "256 is not a valid pattern byte");
}

#[test]
fn pattern_0x1ff_is_not_a_byte() {
    refused_like_qemu_io("write -P 0x1ff 0 512", "0x1ff is not a valid pattern byte");
    refused_like_qemu_io("read -P -1 0 512", "-1 is not a valid pattern byte");
    // Valid spellings still write what they say.
    let d = tempdir();
    let p = image(d.path());
    quring(["io", "-c", "write -P 0xff 0 512", "-c", "write -P 010 512 512", &s(&p)]).ok();
    qemu_io(["-c", "read -P 255 0 512", "-c", "read -P 8 512 512", &s(&p)]).ok();
}

/// `quring io --l2-cache-size SIZE` on the 16 MiB image: succeeds quickly in bounded memory
/// (the cache is cut to the image's L2 tables, as QEMU cuts it).
#[track_caller]
fn l2_cache_capped(size: &str) {
    let d = tempdir();
    let p = image(d.path());
    let t = Instant::now();
    let r = quring(["io", "--l2-cache-size", size, "-c", "read -P 0x5a 0 1M", "-c", "write -P 1 4M 64k", &s(&p)]).ok();
    assert!(t.elapsed() < Duration::from_secs(10), "--l2-cache-size {size} took {:?}", t.elapsed());
    assert_small(&r);
    let r = quring(["bench", "--l2-cache-size", size, "-c", "1000", &s(&p)]).ok();
    assert_small(&r);
    qemu_img(["check", &s(&p)]).ok();
}

#[test]
fn l2_cache_size_2g_is_capped() {
    l2_cache_capped("2G");
}

#[test]
fn l2_cache_size_8g_and_1t_are_capped() {
    l2_cache_capped("8G");
    l2_cache_capped("1T");
    l2_cache_capped("8E");
}

#[test]
fn l2_cache_larger_than_memory_is_refused() {
    // A 1 PiB disk has 128 GiB of L2 tables (256 GiB of cache to hold them all in quring's
    // set-associative cache), more than this machine's memory: asking for a cache that size
    // is an error naming the option, not an abort.
    let d = tempdir();
    let p = d.path().join("huge.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", &s(&p), "1P"]).ok();
    let r = quring(["io", "--l2-cache-size", "8E", "-c", "read 0 512", &s(&p)]);
    assert_clean_failure(&r);
    assert!(r.stderr.contains("L2 cache size too big"), "{}", r.describe());
}

#[test]
fn fio_l2_cache_size_1t_is_capped() {
    let d = tempdir();
    let p = image(d.path());
    // fio writes its verify state file into the working directory: keep it in the temp dir.
    let r = run(Command::new("fio")
        .current_dir(d.path())
        .arg("--name=big-cache")
        .arg(format!("--ioengine=external:{}", fio_plugin().display()))
        .args(["--l2_cache_size=1t", "--refcount_cache_size=1t", "--thread", "--rw=randwrite", "--bs=4k", "--size=16M"])
        .args(["--io_size=4M", "--verify=crc32c"])
        .arg(format!("--filename={}", s(&p))));
    assert!(r.success(), "fio failed:\n{}", r.describe());
    assert_eq!(r.rss_exceeds(128 * 1024), Some(false), "fio peak RSS {} KiB:\n{}", r.maxrss_kib, r.describe());
    qemu_img(["check", &s(&p)]).ok();
}

#[test]
fn bench_depth_and_buffers_are_bounded() {
    // One buffer per request in flight: an absurd depth, or buffers larger than memory
    // together, are refused before any is allocated (qemu-img bench aborts or crashes on
    // these).
    let d = tempdir();
    let p = image(d.path());
    for depth in ["0", "1000000000"] {
        let r = quring(["bench", "-d", depth, "-c", "10", &s(&p)]);
        assert_clean_failure(&r);
        // -d 0 with qemu-img bench's own message; above the ring's limit, quring's.
        let want = if depth == "0" { "2147483647" } else { "8192" };
        assert!(
            r.stderr.contains(&format!("Invalid queue depth specified. Must be between 1 and {want}.")),
            "{}",
            r.describe()
        );
    }
    // 8192 requests of 1 GiB (on a sparse 1 TiB disk) need 8 TiB of buffers.
    let big = d.path().join("big.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", &s(&big), "1T"]).ok();
    let r = quring(["bench", "-d", "8192", "-s", "1G", "-c", "10", &s(&big)]);
    assert_clean_failure(&r);
    assert!(r.stderr.contains("more than this machine's memory"), "{}", r.describe());
    // The deepest queue works, in the memory its 32 MiB of buffers and its ring take.
    let r = quring(["bench", "-d", "8192", "-c", "20000", &s(&p)]).ok();
    assert_eq!(r.rss_exceeds(RSS_KIB + 64 * 1024), Some(false), "peak RSS {} KiB:\n{}", r.maxrss_kib, r.describe());
}
