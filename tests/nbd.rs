//! `quring serve --nbd` against real NBD peers and hostile clients.
//!
//! * `interop_*`: qemu-img info/map/convert/compare and qemu-io over `nbd+unix://` and
//!   `nbd://127.0.0.1` for every image mode (standard, extended L2, v2 with 512-byte
//!   clusters, L2-less, a three-layer backing chain, compressed): the export's map equals
//!   the file's (`qemu-img map`, or `quring map` for L2-less, which QEMU cannot open) as
//!   (start, length, zero, data) runs, its content equals the file's, and qemu-io writes
//!   through the export leave the same content as the same writes made by qemu-io on a
//!   copy of the file; the image passes check afterwards.
//! * `libnbd_*`: nbdinfo (flags, block sizes, `--map`) and an nbdcopy round trip.
//! * `fio_verify_four_connections`: fio's nbd engine, 4 jobs on 4 connections, crc32c
//!   verify, then `qemu-img check` 0.
//! * `misbehaving_clients`: scripted protocol violations get the protocol's answer or a
//!   closed connection, and a connection opened before them carries on.
//! * `fuzz_protocol`: the fuzzer of `nbd/fuzz.rs` for QURING_NBD_FUZZ_SECS (20) seconds
//!   (seed QURING_NBD_FUZZ_SEED); no crash, no hang, no byte changed outside the ranges the
//!   fuzz requests could write, the verifier's region intact, the image clean.
//! * `drops_while_fio_verifies`: 64 connections opened and dropped at random points while
//!   fio verifies on another connection.
//! * `effects::*` (nbd/effects.rs): what --discard, --detect-zeroes, NO_HOLE, FAST_ZERO (v2,
//!   v3, extended L2) and FUA do to the file, engine errors as NBD errnos, --shared=N,
//!   --persistent and the pid file.
//! * `options_and_shutdown`: --read-only, --shared=1 (no multi-conn, one connection at a
//!   time), export names, the handshake limit, --bitmap and -k refusals, the exit without
//!   --persistent, SIGTERM with requests in flight.
//! * `dirty_bitmap_contexts_match_qemu_nbd`: `--bitmap NAME` exports
//!   `qemu:dirty-bitmap:NAME` as qemu-nbd does: `qemu-img map` with `x-dirty-bitmap` and
//!   `nbdinfo --map=qemu:dirty-bitmap:NAME` print the same against both servers (stored
//!   bitmaps read-only; a live bitmap of a writable export after writes through NBD), and
//!   missing or inconsistent bitmaps are refused with qemu-nbd's messages.

#[path = "nbd/client.rs"]
mod client;
mod common;
#[path = "nbd/effects.rs"]
mod effects;
#[path = "nbd/fuzz.rs"]
mod fuzz;

use client::*;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Images

/// An image of one mode and what it must read as.
struct Img {
    name: &'static str,
    path: PathBuf,
    /// Other files the image needs (backing files), next to it.
    l2_less: bool,
    size: u64,
}

fn workload(cs: u64, size: u64, seed: usize, pat: &Path) -> Vec<String> {
    let p = |i: usize| format!("0x{:02x}", pattern_byte(seed * 16 + i));
    let pf = s(pat);
    vec![
        format!("write -P {} 0 {}", p(0), cs),
        format!("write -P {} {} {}", p(1), cs / 4, cs / 4),
        format!("write -P {} {} {}", p(2), cs + cs / 2 + 512, cs + 1024),
        format!("write -s {pf} {} {}", 3 * cs + 512, 2 * cs),
        format!("write -z {} {}", 7 * cs, cs),
        format!("write -P {} {} {}", p(5), 8 * cs, 2 * cs),
        format!("write -z {} {}", 8 * cs, cs),
        format!("write -z -u {} {}", 9 * cs, cs),
        format!("write -P {} {} {}", p(6), 12 * cs, 2 * cs),
        format!("discard {} {}", 12 * cs, cs),
        format!("write -P {} {} {}", p(8), size - cs - 1024, cs + 1024),
        format!("write -P {} {} 4096", p(9), size / 2 + 4096),
    ]
}

fn pattern_file(dir: &Path, seed: u64, len: u64) -> PathBuf {
    let p = dir.join(format!("pattern-{seed}.bin"));
    write_pattern_file(&p, seed, len as usize);
    p
}

fn qcow2_mode(dir: &Path, name: &'static str, o: Qcow2Opts, size: u64) -> Img {
    let path = dir.join(format!("{name}.qcow2"));
    let cs = o.cluster_size as u64;
    let pf = pattern_file(dir, 7, 2 * cs);
    build_qcow2(&path, &o, size, &workload(cs, size, 3, &pf));
    Img { name, path, l2_less: false, size }
}

fn l2_less_mode(dir: &Path, size: u64) -> Img {
    let path = dir.join("l2less.qcow2");
    quring(["create", "-q", "-o", "l2_less=on", &s(&path), &size.to_string()]).ok();
    let mut args: Vec<String> = vec!["io".into()];
    for c in [
        "write -P 0x41 0 1M".to_string(),
        "write -P 0x42 3M 64k".into(),
        format!("write -P 0x43 {} 1M", size - MIB),
        "write -z 4M 128k".into(),
    ] {
        args.push("-c".into());
        args.push(c);
    }
    args.push(s(&path));
    quring(&args).ok();
    Img { name: "l2less", path, l2_less: true, size }
}

fn chain_mode(dir: &Path, size: u64) -> Img {
    let base = dir.join("chain-base.raw");
    let pf = pattern_file(dir, 11, 4 * MIB);
    build_raw(
        &base,
        size,
        &[format!("write -s {} 0 {}", s(&pf), 4 * MIB), format!("write -P 0x5a {} {}", 6 * MIB, MIB)],
    );
    let mid = dir.join("chain-mid.qcow2");
    let o =
        Qcow2Opts { cluster_size: 4096, backing: Some(("chain-base.raw".into(), "raw".into())), ..Default::default() };
    build_qcow2(&mid, &o, size, &workload(4096, size, 5, &pf));
    let top = dir.join("chain-top.qcow2");
    let o = Qcow2Opts {
        cluster_size: 65536,
        extended_l2: true,
        backing: Some(("chain-mid.qcow2".into(), "qcow2".into())),
        ..Default::default()
    };
    build_qcow2(
        &top,
        &o,
        size,
        &[
            "write -P 0x81 4096 2048".into(),
            "write -z 131072 4096".into(),
            "write -z -u 262144 65536".into(),
            "discard 327680 65536".into(),
            "write -P 0x83 1048000 200000".into(),
        ],
    );
    Img { name: "chain", path: top, l2_less: false, size }
}

fn compressed_mode(dir: &Path, size: u64) -> Img {
    let src = dir.join("compress-src.qcow2");
    let pf = pattern_file(dir, 13, 2 * 65536);
    build_qcow2(&src, &Qcow2Opts::default(), size, &workload(65536, size, 9, &pf));
    let path = dir.join("compressed.qcow2");
    qemu_img(["convert", "-q", "-c", "-O", "qcow2", &s(&src), &s(&path)]).ok();
    // Writes after compression: partial overwrites of compressed clusters.
    qemu_io_cmds(&path, "qcow2", &["write -P 0x77 4096 4096".into(), "write -z 65536 512".into()]);
    Img { name: "compressed", path, l2_less: false, size }
}

fn all_modes(dir: &Path) -> Vec<Img> {
    let size = 16 * MIB;
    vec![
        qcow2_mode(dir, "standard", Qcow2Opts::default(), size),
        qcow2_mode(dir, "extl2", Qcow2Opts { cluster_size: 32768, extended_l2: true, ..Default::default() }, size),
        qcow2_mode(dir, "v2-512", Qcow2Opts { cluster_size: 512, compat: Compat::V010, ..Default::default() }, size),
        l2_less_mode(dir, size),
        chain_mode(dir, size),
        compressed_mode(dir, size),
    ]
}

/// A copy of the image file (backing files are shared, they are only read).
fn copy_of(img: &Img, tag: &str) -> PathBuf {
    let p = img.path.with_file_name(format!("{}-{tag}.qcow2", img.name));
    std::fs::copy(&img.path, &p).unwrap();
    p
}

/// The file's map as merged (start, length, zero, data) runs.
fn file_map(path: &Path, l2_less: bool) -> Vec<(u64, u64, bool, bool)> {
    let r = if l2_less {
        quring(["map", "--output=json", &s(path)]).ok()
    } else {
        qemu_img(["map", "--output=json", "-U", "-f", "qcow2", &s(path)]).ok()
    };
    runs(&r.json())
}

fn runs(v: &Value) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("map is an array") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (zero, data) = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        match out.last_mut() {
            Some(l) if l.2 == zero && l.3 == data && l.0 + l.1 == start => l.1 += len,
            _ => out.push((start, len, zero, data)),
        }
    }
    out
}

/// The file's content as raw.
fn raw_of(path: &Path, l2_less: bool, out: &Path) {
    if l2_less {
        quring(["convert", "-O", "raw", &s(path), &s(out)]).ok();
    } else {
        qemu_img(["convert", "-U", "-f", "qcow2", "-O", "raw", &s(path), &s(out)]).ok();
    }
}

#[track_caller]
fn check_clean(path: &Path, l2_less: bool) {
    let r = if l2_less { quring(["check", &s(path)]) } else { qemu_img(["check", "-f", "qcow2", &s(path)]) };
    assert_eq!(r.status(), 0, "check after serving:\n{}", r.describe());
}

// ---------------------------------------------------------------------------------------------
// Interop

fn interop(tcp: bool) {
    let d = tempdir();
    let dir = d.path();
    for img in all_modes(dir) {
        let tag = if tcp { "tcp" } else { "unix" };
        let name = format!("{}/{tag}", img.name);
        let served = copy_of(&img, tag);
        let reference = copy_of(&img, &format!("{tag}-ref"));
        let want_map = file_map(&served, img.l2_less);
        let want_raw = dir.join(format!("{}-{tag}-want.raw", img.name));
        raw_of(&served, img.l2_less, &want_raw);

        let srv = Server::start(dir, &served, tcp, &["--shared=0", "--discard=unmap"]);
        let uri = srv.uri();
        // info
        let info = qemu_img(["info", "--output=json", &uri]).ok().json();
        assert_eq!(info["virtual-size"].as_u64(), Some(img.size), "[{name}] qemu-img info: {info}");
        // map
        let got = runs(&qemu_img(["map", "--output=json", &uri]).ok().json());
        assert_eq!(got, want_map, "[{name}] qemu-img map over NBD differs from the file's map");
        // convert
        let got_raw = dir.join(format!("{}-{tag}-got.raw", img.name));
        qemu_img(["convert", "-f", "raw", "-O", "raw", &uri, &s(&got_raw)]).ok();
        assert!(raw_bytes_equal(&got_raw, &want_raw), "[{name}] qemu-img convert of the export differs from the file");
        // compare
        let r = if img.l2_less {
            qemu_img(["compare", "-f", "raw", "-F", "raw", &uri, &s(&want_raw)])
        } else {
            qemu_img(["compare", "-U", "-f", "raw", "-F", "qcow2", &uri, &s(&img.path)])
        };
        assert_eq!(r.status(), 0, "[{name}] qemu-img compare:\n{}", r.describe());
        // qemu-io writes through the export, the same writes on a copy of the file.
        let cs = 65536u64;
        let cmds = vec![
            "write -P 0x5c 0 64k".to_string(),
            format!("write -P 0x5d {} 4k", cs + 512),
            format!("write -f -P 0x5e {} 128k", 5 * cs),
            format!("write -z {} 64k", 2 * cs),
            format!("write -z -u {} 128k", 10 * cs),
            format!("discard {} {}", 14 * cs, 2 * cs),
            "flush".into(),
            format!("write -P 0x5f {} 1536", img.size - 1536),
        ];
        let mut args = vec!["-f".to_string(), "raw".into()];
        for c in &cmds {
            args.extend(["-c".into(), c.clone()]);
        }
        args.push(uri.clone());
        let r = qemu_io(&args).ok();
        assert!(
            !r.stdout.contains("failed") && !r.stderr.contains("rror"),
            "[{name}] qemu-io over NBD:\n{}",
            r.describe()
        );
        let verify = qemu_io([
            "-f",
            "raw",
            "-c",
            "read -P 0x5c 0 64k",
            "-c",
            &format!("read -P 0x5f {} 1536", img.size - 1536),
            &uri,
        ])
        .ok();
        assert!(!verify.stdout.contains("fail"), "[{name}] read back over NBD:\n{}", verify.describe());
        let log = srv.stop_ok();
        check_clean(&served, img.l2_less);
        // The reference: L2-less images through qemu-io on their raw content.
        let (ref_path, ref_fmt) = if img.l2_less {
            let r = dir.join(format!("{}-{tag}-ref.raw", img.name));
            std::fs::copy(&want_raw, &r).unwrap();
            (r, "raw")
        } else {
            (reference, "qcow2")
        };
        qemu_io_cmds(&ref_path, ref_fmt, &cmds);
        let (a, b) = (dir.join(format!("{}-{tag}-a.raw", img.name)), dir.join(format!("{}-{tag}-b.raw", img.name)));
        raw_of(&served, img.l2_less, &a);
        if img.l2_less {
            std::fs::copy(&ref_path, &b).unwrap();
        } else {
            raw_of(&ref_path, false, &b);
        }
        if let Some(off) = first_difference(&a, &b).unwrap() {
            panic!(
                "[{name}] after the same qemu-io writes, the served image differs from the reference at byte {off}\n{log}"
            );
        }
    }
}

#[test]
fn interop_unix() {
    interop(false);
}

#[test]
fn interop_tcp() {
    interop(true);
}

// ---------------------------------------------------------------------------------------------
// libnbd

fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let r = run(Command::new("nbdinfo").args(["--map", uri])).ok();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for line in r.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, ty): (u64, u64, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        let (zero, data) = (ty & 2 != 0, ty & 1 == 0);
        match out.last_mut() {
            Some(l) if l.2 == zero && l.3 == data && l.0 + l.1 == start => l.1 += len,
            _ => out.push((start, len, zero, data)),
        }
    }
    out
}

#[test]
fn libnbd_nbdinfo_and_nbdcopy() {
    let d = tempdir();
    let dir = d.path();
    let img = chain_mode(dir, 16 * MIB);
    let want_map = file_map(&img.path, false);
    let want_raw = dir.join("want.raw");
    raw_of(&img.path, false, &want_raw);
    let srv = Server::start(dir, &img.path, false, &["-e", "4", "-x", "disk", "-D", "the chain", "--read-only"]);
    let Addr::Unix(sock) = &srv.addr else { unreachable!("a unix socket server") };
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let info: Value = serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &uri])).ok().stdout).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "disk", "{info}");
    assert_eq!(e["description"], "the chain", "{info}");
    assert_eq!(e["export-size"].as_u64(), Some(img.size), "{info}");
    assert_eq!(e["is_read_only"], true, "{info}");
    assert_eq!(e["can_multi_conn"], true, "{info}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512), "{info}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20), "{info}");
    assert_eq!(nbdinfo_map(&uri), want_map, "nbdinfo --map differs from qemu-img map of the file");
    let list = run(Command::new("nbdinfo").args(["--list", &srv.uri()])).ok();
    assert!(list.stdout.contains("export=\"disk\""), "{}", list.describe());
    // nbdcopy out of the export (multi-conn) ...
    let out = dir.join("out.raw");
    run(Command::new("nbdcopy").args([&uri, &s(&out)])).ok();
    assert!(raw_bytes_equal(&out, &want_raw), "nbdcopy of the export differs from the file");
    srv.stop_ok();
    // ... and into a fresh export.
    let fresh = dir.join("fresh.qcow2");
    create_qcow2(&fresh, &Qcow2Opts::default(), img.size);
    let srv = Server::start(dir, &fresh, false, &["-e", "0", "--discard=unmap", "--detect-zeroes=unmap"]);
    run(Command::new("nbdcopy").args([&s(&out), &srv.uri()])).ok();
    let back = dir.join("back.raw");
    run(Command::new("nbdcopy").args([&srv.uri(), &s(&back)])).ok();
    srv.stop_ok();
    check_clean(&fresh, false);
    assert!(raw_bytes_equal(&back, &want_raw), "nbdcopy round trip changed the content");
    qemu_img(["compare", "-f", "qcow2", "-F", "raw", &s(&fresh), &s(&want_raw)]).ok();
}

// ---------------------------------------------------------------------------------------------
// fio

fn fio_nbd(uri: &str, extra: &[String]) -> Run {
    let mut c = Command::new("fio");
    c.args([
        "--name=nbd".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--bs=4k".into(),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--do_verify=1".into(),
        "--verify_state_save=0".into(),
        "--randrepeat=1".into(),
    ]);
    c.args(extra);
    run_with_timeout(&mut c, Duration::from_secs(300))
}

#[track_caller]
fn assert_fio_ok(r: &Run, what: &str) {
    assert_eq!(r.status(), 0, "[{what}] fio failed:\n{}", r.describe());
    assert!(
        r.stdout.contains("err= 0") && !r.stdout.contains("verify:") && !r.stderr.contains("verify"),
        "[{what}] {}",
        r.describe()
    );
}

#[test]
fn fio_verify_four_connections() {
    let d = tempdir();
    let img = d.path().join("fio.qcow2");
    create_qcow2(&img, &Qcow2Opts::default(), 256 * MIB);
    let srv = Server::start(d.path(), &img, false, &["-e", "4"]);
    let r = fio_nbd(
        &srv.uri(),
        &[
            "--rw=randwrite".into(),
            "--iodepth=16".into(),
            "--numjobs=4".into(),
            "--size=32M".into(),
            "--offset_increment=64M".into(),
        ],
    );
    let log = srv.stop_ok();
    assert_fio_ok(&r, "4 jobs");
    assert_eq!(r.stdout.matches("err= 0").count(), 4, "{}", r.describe());
    assert!(log.contains("writes 32768"), "every write reached the server:\n{log}");
    let c = qemu_img(["check", &s(&img)]);
    assert_eq!(c.status(), 0, "{}", c.describe());
}

// ---------------------------------------------------------------------------------------------
// Misbehaving clients

fn raw_go(addr: &Addr) -> Stream {
    let mut s = Stream::connect(addr).unwrap();
    greet(&mut s, 3).unwrap();
    s.write_all(&option_frame(OPT_GO, &go_data(b"", &[]))).unwrap();
    loop {
        let (_, ty, _) = read_option_reply(&mut s).unwrap();
        if ty == REP_ACK {
            return s;
        }
        assert_eq!(ty, REP_INFO);
    }
}

/// Reads one simple reply: (error, cookie).
fn simple(s: &mut Stream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
    (be32(&r[4..]), be64(&r[8..]))
}

#[test]
fn misbehaving_clients() {
    let d = tempdir();
    let img = d.path().join("m.qcow2");
    build_qcow2(&img, &Qcow2Opts::default(), 64 * MIB, &["write -P 0x3c 0 64M".into()]);
    let before = d.path().join("before.raw");
    raw_of(&img, false, &before);
    let srv = Server::start(d.path(), &img, false, &["-e", "0", "--handshake-limit", "2"]);
    let addr = srv.addr.clone();
    // A connection made first, used at the end: the others must not disturb it.
    let mut bystander = Client::connect(&addr, Want::default()).unwrap();
    assert_eq!(bystander.read(0, 4096).unwrap().unwrap(), vec![0x3c; 4096]);

    // Handshake: unknown client flags, bad option magic, a huge option, a client without
    // fixed newstyle trying GO: the connection is closed.
    for case in 0..4 {
        let mut s = Stream::connect(&addr).unwrap();
        match case {
            0 => greet(&mut s, 0x80).unwrap(),
            1 => {
                greet(&mut s, 3).unwrap();
                s.write_all(&[0x42; 16]).unwrap();
            }
            2 => {
                greet(&mut s, 3).unwrap();
                let mut f = option_frame(OPT_GO, &[]);
                f[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
                s.write_all(&f).unwrap();
            }
            _ => {
                greet(&mut s, 0).unwrap();
                s.write_all(&option_frame(OPT_GO, &go_data(b"", &[]))).unwrap();
            }
        }
        assert!(s.closed_within(Duration::from_secs(10)), "handshake case {case}: connection left open");
    }
    // Unknown and malformed options get errors, and GO still works after them.
    {
        let mut s = Stream::connect(&addr).unwrap();
        greet(&mut s, 3).unwrap();
        s.write_all(&option_frame(77, b"junk")).unwrap();
        assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNSUP);
        s.write_all(&option_frame(OPT_GO, &[0, 0, 0, 200, 1])).unwrap();
        assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_INVALID);
        s.write_all(&option_frame(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]))).unwrap();
        assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_INVALID, "meta context before structured replies");
        s.write_all(&option_frame(OPT_GO, &go_data(b"nope", &[]))).unwrap();
        assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNKNOWN);
        s.write_all(&option_frame(OPT_GO, &go_data(b"", &[]))).unwrap();
        while read_option_reply(&mut s).unwrap().1 != REP_ACK {}
        s.write_all(&request(CMD_READ, 0, 9, 0, 512)).unwrap();
        assert_eq!(simple(&mut s), (0, 9));
        let mut data = [0u8; 512];
        s.read_exact(&mut data).unwrap();
        assert_eq!(data, [0x3c; 512]);
    }
    // A client that sends nothing is dropped after the handshake limit.
    {
        let mut s = Stream::connect(&addr).unwrap();
        let t = Instant::now();
        assert!(s.closed_within(Duration::from_secs(10)), "silent client kept");
        assert!(t.elapsed() >= Duration::from_millis(1500), "dropped after {:?}, before the limit", t.elapsed());
    }
    // Transmission, simple replies: each invalid request gets its error.
    {
        let mut s = raw_go(&addr);
        let size = 64 * MIB;
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (request(99, 0, 1, 0, 512).to_vec(), EINVAL),
            (request(CMD_READ, 1 << 7, 2, 0, 512).to_vec(), EINVAL),
            (request(CMD_READ, FLAG_DF, 3, 0, 512).to_vec(), EINVAL),
            (request(CMD_READ, 0, 4, size - 512, 1024).to_vec(), EINVAL),
            (request(CMD_READ, 0, 5, u64::MAX - 100, 512).to_vec(), EINVAL),
            (request(CMD_READ, 0, 6, 1, 512).to_vec(), EINVAL),
            (request(CMD_READ, 0, 7, 0, 33 << 20).to_vec(), EINVAL),
            (request(CMD_BLOCK_STATUS, 0, 8, 0, 512).to_vec(), EINVAL),
            ([&request(CMD_WRITE, 0, 10, size, 512)[..], &[0xee; 512]].concat(), ENOSPC),
            ([&request(CMD_WRITE, 0, 11, 100, 512)[..], &[0xee; 512]].concat(), EINVAL),
            ([&request(CMD_WRITE, FLAG_DF, 12, 0, 512)[..], &[0xee; 512]].concat(), EINVAL),
            (request(CMD_WRITE_ZEROES, 0, 13, size - 512, 1024).to_vec(), ENOSPC),
            (request(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 14, 512, 512).to_vec(), ENOTSUP),
            (request(CMD_TRIM, 0, 15, size, 512).to_vec(), EINVAL),
            (request(CMD_TRIM, FLAG_NO_HOLE, 16, 0, 512).to_vec(), EINVAL),
            (request(CMD_READ, 0, 17, 0, 0).to_vec(), 0),
            (request(CMD_WRITE, 0, 18, 0, 0).to_vec(), 0),
            (request(CMD_TRIM, 0, 19, 7, 100).to_vec(), 0),
            (request(CMD_FLUSH, 0, 20, 0, 0).to_vec(), 0),
            (request(CMD_CACHE, 0, 21, 0, 1 << 20).to_vec(), 0),
        ];
        for (req, err) in &cases {
            s.write_all(req).unwrap();
            let (e, cookie) = simple(&mut s);
            assert_eq!(e, *err, "cookie {cookie}");
        }
        // An oversized WRITE: refused, its 33 MiB payload read and dropped, the stream in
        // step afterwards.
        let big = 33u32 << 20;
        s.write_all(&request(CMD_WRITE, 0, 30, 0, big)).unwrap();
        s.write_all(&vec![0xab; big as usize]).unwrap();
        assert_eq!(simple(&mut s), (EINVAL, 30));
        s.write_all(&request(CMD_READ, 0, 31, 0, 512)).unwrap();
        assert_eq!(simple(&mut s), (0, 31));
        let mut data = [0u8; 512];
        s.read_exact(&mut data).unwrap();
        assert_eq!(data, [0x3c; 512], "refused writes changed nothing");
        // A bad magic ends the connection.
        let mut bad = request(CMD_READ, 0, 32, 0, 512);
        bad[0] ^= 0xff;
        s.write_all(&bad).unwrap();
        assert!(s.closed_within(Duration::from_secs(10)), "connection kept after a bad magic");
    }
    // Structured replies: errors come as error chunks with a message.
    {
        let mut c = Client::connect(&addr, Want::default()).unwrap();
        let r = c.call(CMD_READ, 0, 1, 512, &[]).unwrap();
        assert_eq!(r.error, EINVAL);
        assert!(r.message.contains("align"), "{r:?}");
        let r = c.call(99, 0, 0, 0, &[]).unwrap();
        assert_eq!(r.error, EINVAL);
        let r = c.call(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 0, 64 << 20, &[]).unwrap();
        assert_eq!((r.error, r.extents.len()), (0, 1), "{r:?}");
        assert!(r.extents[0].0 <= 64 << 20);
        let r = c.call(CMD_READ, FLAG_DF, 0, 65536, &[]).unwrap();
        assert_eq!(r.data, vec![0x3c; 65536]);
        c.disconnect();
    }
    // Connections dropped mid-header, mid-payload and with reads in flight.
    for cut in [3usize, 28 + 100, 28 * 3] {
        let mut s = raw_go(&addr);
        let mut b = Vec::new();
        for i in 0..4u64 {
            b.extend_from_slice(&request(CMD_READ, 0, 100 + i, i * MIB, 1 << 20));
        }
        let mut w = request(CMD_WRITE, 0, 200, 8 * MIB, 4096).to_vec();
        w.extend_from_slice(&[0x99; 4096]);
        let stream = if cut == 28 + 100 { w } else { b };
        s.write_all(&stream[..cut.min(stream.len())]).unwrap();
        drop(s);
    }
    // The bystander was not disturbed.
    assert_eq!(bystander.read(0, 4096).unwrap().unwrap(), vec![0x3c; 4096]);
    assert_eq!(bystander.write(MIB, &[0x11; 4096], FLAG_FUA).unwrap(), 0);
    assert_eq!(bystander.read(MIB, 4096).unwrap().unwrap(), vec![0x11; 4096]);
    bystander.disconnect();
    let mut srv = srv;
    assert!(srv.alive());
    srv.stop_ok();
    check_clean(&img, false);
    // Only the bystander's write changed the image.
    let after = d.path().join("after.raw");
    raw_of(&img, false, &after);
    let (a, b) = (std::fs::read(&before).unwrap(), std::fs::read(&after).unwrap());
    let diff: Vec<usize> = (0..a.len()).step_by(512).filter(|&i| a[i..i + 512] != b[i..i + 512]).collect();
    assert_eq!(diff.first().copied(), Some(MIB as usize), "first changed sector");
    assert_eq!(diff.last().copied(), Some(MIB as usize + 4096 - 512), "last changed sector");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing

/// The fuzz image: a qcow2 over a raw base, both with content, and its layout.
fn fuzz_image(dir: &Path) -> (PathBuf, fuzz::Layout) {
    let size = 64 * MIB;
    let base = dir.join("fuzz-base.raw");
    let pf = pattern_file(dir, 21, size);
    build_raw(&base, size, &[format!("write -s {} 0 {size}", s(&pf))]);
    let img = dir.join("fuzz.qcow2");
    let o = Qcow2Opts { backing: Some(("fuzz-base.raw".into(), "raw".into())), ..Default::default() };
    let mut cmds = Vec::new();
    for i in 0..64u64 {
        if i % 3 == 0 {
            cmds.push(format!("write -P 0x{:02x} {} 512k", pattern_byte(i as usize), i * MIB));
        } else if i % 7 == 0 {
            cmds.push(format!("write -z {} 256k", i * MIB));
        }
    }
    build_qcow2(&img, &o, size, &cmds);
    let l = fuzz::Layout { size, fuzz: (0, 32 * MIB), verify: (32 * MIB, 40 * MIB), guard: (40 * MIB, size) };
    (img, l)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        let v = v.trim();
        if let Some(h) = v.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { v.parse() }
            .unwrap_or_else(|_| panic!("{name}={v}"))
    })
}

#[test]
fn fuzz_protocol() {
    let secs = env_u64("QURING_NBD_FUZZ_SECS").unwrap_or(20);
    let seed = env_u64("QURING_NBD_FUZZ_SEED").unwrap_or(0x6e62_6466_757a_7a01);
    let d = tempdir();
    let (img, l) = fuzz_image(d.path());
    let before = d.path().join("before.raw");
    raw_of(&img, false, &before);
    let initial = std::fs::read(&before).unwrap();
    let tcp = seed % 2 == 1;
    let mut srv = Server::start(
        d.path(),
        &img,
        tcp,
        &["-e", "0", "--discard=unmap", "--detect-zeroes=on", "--handshake-limit", "5"],
    );
    eprintln!("nbd fuzz: seed {seed:#x}, {secs} s, {}", if tcp { "tcp" } else { "unix" });
    let verify_init = initial[l.verify.0 as usize..l.verify.1 as usize].to_vec();
    let r = fuzz::run(&srv.addr, &l, seed, Duration::from_secs(secs), 3, verify_init);
    let alive = srv.alive();
    let fuzz::Outcome { touched, shadow, stats: line } = match r {
        Ok(x) => x,
        Err(e) => panic!("nbd fuzz (seed {seed:#x}): {e}\nserver alive: {alive}\nserver log:\n{}", srv.log_text()),
    };
    assert!(alive, "the server died: {}", srv.log_text());
    eprintln!("nbd fuzz: {line}");
    let log = srv.stop_ok();
    let chk = qemu_img(["check", &s(&img)]);
    assert_eq!(chk.status(), 0, "qemu-img check after fuzzing (seed {seed:#x}):\n{}\n{log}", chk.describe());
    let after = d.path().join("after.raw");
    raw_of(&img, false, &after);
    let got = std::fs::read(&after).unwrap();
    assert_eq!(&got[l.verify.0 as usize..l.verify.1 as usize], &shadow[..], "the verifier's region (seed {seed:#x})");
    // Outside what fuzz requests could write (and the verifier's region) nothing changed.
    let mut pos = 0u64;
    let check_range = |a: u64, b: u64| {
        if a < b
            && let Some(i) = (a..b)
                .step_by(512)
                .find(|&i| got[i as usize..(i + 512).min(b) as usize] != initial[i as usize..(i + 512).min(b) as usize])
        {
            panic!("nbd fuzz (seed {seed:#x}): sector at {i} changed, outside every written range\n{log}");
        }
    };
    let mut skip = touched.clone();
    skip.push(l.verify);
    let skip = fuzz::merge(skip, l.size);
    for &(a, b) in &skip {
        check_range(pos, a);
        pos = pos.max(b);
    }
    check_range(pos, l.size);
    let unwritten = l.size - skip.iter().map(|(a, b)| b - a).sum::<u64>();
    let in_fuzz = fuzz::merge(touched, l.fuzz.1).iter().map(|(a, b)| b.min(&l.fuzz.1) - a).sum::<u64>();
    eprintln!(
        "nbd fuzz: {} KiB of the {} MiB fuzz region written by fuzz requests; {} KiB outside every written range unchanged",
        in_fuzz >> 10,
        (l.fuzz.1 - l.fuzz.0) >> 20,
        unwritten >> 10
    );
}

#[test]
fn drops_while_fio_verifies() {
    let d = tempdir();
    let img = d.path().join("drops.qcow2");
    create_qcow2(&img, &Qcow2Opts::default(), 128 * MIB);
    let srv = Server::start(d.path(), &img, false, &["-e", "0"]);
    let l = fuzz::Layout { size: 128 * MIB, fuzz: (64 * MIB, 128 * MIB), verify: (0, 64 * MIB), guard: (0, 0) };
    let uri = srv.uri();
    let fio = std::thread::spawn(move || {
        fio_nbd(
            &uri,
            &["--rw=randwrite".into(), "--iodepth=16".into(), "--size=64M".into(), "--verify_backlog=1024".into()],
        )
    });
    let mut rng = Rng(0xd205);
    let mut opened = 0;
    let start = Instant::now();
    while opened < 64 || (!fio.is_finished() && start.elapsed() < Duration::from_secs(120)) {
        let mut touched = Vec::new();
        fuzz::drop_session(&srv.addr, &l, &mut rng, &mut touched).unwrap();
        opened += 1;
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    }
    let r = fio.join().unwrap();
    let log = srv.stop_ok();
    assert_fio_ok(&r, "fio next to dropped connections");
    eprintln!("{opened} connections dropped while fio ran");
    assert!(opened >= 64);
    let c = qemu_img(["check", &s(&img)]);
    assert_eq!(c.status(), 0, "{}\n{log}", c.describe());
}

// ---------------------------------------------------------------------------------------------
// Options and shutdown

#[test]
fn options_and_shutdown() {
    let d = tempdir();
    let dir = d.path();
    let img = dir.join("o.qcow2");
    build_qcow2(&img, &Qcow2Opts::default(), 16 * MIB, &["write -P 0x61 0 1M".into()]);

    // Refused options.
    let r = quring(["serve", "--nbd", "-k", &s(&dir.join("x.sock")), "--bitmap", "b0", &s(&img)]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    assert_eq!(r.stderr, "quring: Bitmap 'b0' is not found\n", "{}", r.describe());
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let r = quring(["serve", "--nbd", "-k", &s(&file), &s(&img)]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let r = quring(["serve", "--nbd", "--detect-zeroes=unmap", &s(&img)]);
    assert_eq!(r.status(), 1, "{}", r.describe());
    let r = quring(["serve", "--vhost-user-blk", "/tmp/x", "--nbd", &s(&img)]);
    assert_ne!(r.status(), 0, "{}", r.describe());

    // --read-only, --shared=1, export name.
    {
        let srv = Server::start(dir, &img, false, &["--read-only", "-x", "ro"]);
        let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
        assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
        assert_eq!(c.flags & TFLAG_CAN_MULTI_CONN, 0, "multi-conn with --shared=1");
        assert_eq!(c.write(0, &[0u8; 512], 0).unwrap(), EPERM);
        assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).unwrap().error, EPERM);
        assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![0x61; 512]);
        // A second connection waits for the first to go.
        let mut second = Stream::connect(&srv.addr).unwrap();
        second.set_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut g = [0u8; 18];
        assert!(second.read_exact(&mut g).is_err(), "a second connection was served with --shared=1");
        c.disconnect();
        second.set_timeout(Some(Duration::from_secs(10))).unwrap();
        second.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g), NBDMAGIC);
        second.write_all(&3u32.to_be_bytes()).unwrap();
        second.write_all(&option_frame(OPT_GO, &go_data(b"rw", &[]))).unwrap();
        assert_eq!(read_option_reply(&mut second).unwrap().1, REP_ERR_UNKNOWN);
        second.write_all(&option_frame(OPT_GO, &go_data(b"ro", &[]))).unwrap();
        while read_option_reply(&mut second).unwrap().1 != REP_ACK {}
        drop(second);
        srv.stop_ok();
    }

    // Without --persistent the server exits when its last client leaves.
    {
        let sock = dir.join("once.sock");
        let pid = dir.join("once.pid");
        let mut child = Command::new(quring_bin())
            .args(["serve", "--nbd", "-k", &s(&sock), "--pid-file", &s(&pid), &s(&img)])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !pid.exists() {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = Client::connect(&Addr::Unix(sock.clone()), Want::default()).unwrap();
        assert_eq!(c.write(MIB, &[0x62; 4096], 0).unwrap(), 0);
        c.disconnect();
        let t = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "the server stayed after its only client left");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(st.success(), "{st}");
        assert!(!sock.exists() && !pid.exists());
        check_clean(&img, false);
    }

    // SIGTERM with requests in flight: they complete, the server exits 0.
    {
        let srv = Server::start(dir, &img, true, &["-e", "0"]);
        let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
        for i in 0..64u64 {
            c.send(CMD_WRITE, 0, i * 65536, 65536, &[0x63; 65536]).unwrap();
        }
        let log = srv.stop_ok();
        // Replies for what the server read before the signal, then the end of the stream.
        let mut answered = 0;
        while let Ok(r) = c.recv() {
            assert_eq!(r.error, 0);
            answered += 1;
        }
        assert!(log.contains("SIGTERM"), "{log}");
        eprintln!("{answered} of 64 writes answered before the shutdown");
        check_clean(&img, false);
    }
}

/// qemu-nbd on `img` with `args`, listening on a Unix socket in `dir`; stopped on drop.
struct QemuNbd {
    child: std::process::Child,
    sock: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, img: &Path, args: &[&str]) -> QemuNbd {
        let sock = dir.join(format!("qemu-nbd-{}.sock", std::process::id() as u64 * 1000 + rand_tag()));
        let child = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t", "-k", &s(&sock)])
            .args(args)
            .arg(img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn qemu-nbd");
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd { child, sock }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for QemuNbd {
    /// SIGTERM: qemu-nbd closes the image cleanly (its bitmaps stored).
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn rand_tag() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a client sees of bitmap `name` through the export at `uri`: `qemu-img map` with
/// `x-dirty-bitmap` (the JSON as printed) and `nbdinfo --map=qemu:dirty-bitmap:NAME`.
fn dirty_views(uri: &str, name: &str) -> (String, String) {
    let sock = uri.split("socket=").nth(1).unwrap();
    let opts = format!("driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}");
    let map = qemu_img(["map", "--output=json", "--image-opts", &opts]).ok().stdout;
    let info = run(Command::new("nbdinfo").arg(format!("--map=qemu:dirty-bitmap:{name}")).arg(uri)).ok().stdout;
    (map, info)
}

#[test]
fn dirty_bitmap_contexts_match_qemu_nbd() {
    let d = tempdir();
    let dir = d.path();
    let img = dir.join("bm.qcow2");
    create_qcow2(&img, &Qcow2Opts::cluster(65536), 24 * MIB);
    let q = |args: &[&str]| {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(args);
        qemu_img(&a).ok();
    };
    q(&["--add", &s(&img), "b"]);
    q(&["--add", "-g", "4096", &s(&img), "fine"]);
    q(&["--add", "-g", "2097152", &s(&img), "coarse"]);
    qemu_io_cmds(
        &img,
        "qcow2",
        &[
            "write -P 1 0 4k".into(),
            "write -P 2 100k 200k".into(),
            "write -z 3M 1M".into(),
            "discard 9M 64k".into(),
            "write -P 3 20971000 4096".into(),
        ],
    );
    q(&["--disable", &s(&img), "coarse"]);
    q(&["--add", &s(&img), "empty"]);
    let names = ["b", "fine", "coarse", "empty"];
    let bargs: Vec<&str> = names.iter().flat_map(|n| ["-B", *n]).collect();

    // Stored bitmaps, read-only exports.
    let ours = Server::start(dir, &img, false, &[&["--read-only"][..], &bargs].concat());
    let theirs = QemuNbd::start(dir, &img, &[&["-r"][..], &bargs].concat());
    for n in names {
        let (a, b) = (dirty_views(&ours.uri(), n), dirty_views(&theirs.uri(), n));
        assert_eq!(a, b, "bitmap {n}: quring serve (left) vs qemu-nbd (right)");
    }
    assert!(dirty_views(&ours.uri(), "b").1.contains("dirty"));
    // The contexts both list.
    let contexts = |uri: &str| {
        let v: Value = serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", uri])).ok().stdout).unwrap();
        let mut c: Vec<String> = v["exports"][0]["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .filter(|c| c != "qemu:allocation-depth")
            .collect();
        c.sort();
        c
    };
    assert_eq!(contexts(&ours.uri()), contexts(&theirs.uri()));
    drop(theirs);
    ours.stop(Duration::from_secs(20));

    // A live bitmap of a writable export: writes through NBD show at once.
    let copy = dir.join("bm-qemu.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let writes = ["write -P 7 5M 8k", "write -z 7M 128k", "discard 12M 1M", "write -P 8 20M 512"];
    let ours = Server::start(dir, &img, false, &["-B", "b", "-B", "coarse", "--discard=unmap"]);
    let theirs = QemuNbd::start(dir, &copy, &["-B", "b", "-B", "coarse", "--discard=unmap"]);
    for (uri, who) in [(ours.uri(), "quring"), (theirs.uri(), "qemu-nbd")] {
        let mut a = vec!["-f".to_string(), "raw".into()];
        for w in writes {
            a.extend(["-c".into(), w.into()]);
        }
        a.push(uri);
        let r = qemu_io(&a);
        assert!(r.status() == 0 && !r.stdout.contains("error"), "{who}: {}", r.describe());
    }
    for n in ["b", "coarse"] {
        let (a, b) = (dirty_views(&ours.uri(), n), dirty_views(&theirs.uri(), n));
        assert_eq!(a, b, "live bitmap {n}: quring serve (left) vs qemu-nbd (right)");
    }
    drop(theirs);
    ours.stop(Duration::from_secs(20));
    let r = qemu_img(["check", &s(&img)]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(dirty_views_of_file(dir, &img, "b"), dirty_views_of_file(dir, &copy, "b"), "stored after the session");

    // Refusals, word for word.
    let bad = dir.join("bad.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    let mut child = Command::new(quring_bin())
        .args(["io", "-c", "write -P 1 0 64k", "-c", "flush", "-c", "sleep 60000", &s(&bad)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !qemu_img(["info", "-U", &s(&bad)]).ok().stdout.contains("in-use") {
        assert!(start.elapsed() < Duration::from_secs(20), "the writer never marked the bitmaps in use");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    // The killed writer's lock goes with its file description, which its io_uring ring
    // may hold for a moment after the exit (the ring is torn down asynchronously).
    let start = Instant::now();
    while qemu_img(["info", &s(&bad)]).status() != 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the killed writer's lock stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, path) in [("nope", &img), ("b", &bad)] {
        let ours = quring(["serve", "--nbd", "-r", "-k", &s(&dir.join("r.sock")), "-B", name, &s(path)]);
        let theirs = run(Command::new("qemu-nbd")
            .args(["-r", "-f", "qcow2", "-k", &s(&dir.join("q.sock")), "-B", name])
            .arg(path));
        assert_eq!((ours.status(), theirs.status()), (1, 1), "{}\n{}", ours.describe(), theirs.describe());
        assert_eq!(ours.stderr.replace("quring:", "qemu-nbd:"), theirs.stderr, "-B {name}");
    }
}

/// [`dirty_views`] of a file's bitmap through a read-only `quring serve`.
fn dirty_views_of_file(dir: &Path, img: &Path, name: &str) -> (String, String) {
    let srv = Server::start(dir, img, false, &["--read-only", "-B", name]);
    let v = dirty_views(&srv.uri(), name);
    srv.stop(Duration::from_secs(20));
    v
}
