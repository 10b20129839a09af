//! What the options and request flags do to the image, checked in the file afterwards with
//! `qemu-img map` (zero flags, allocation) and through reads: `--discard`, `--detect-zeroes`,
//! WRITE_ZEROES with and without NO_HOLE, FAST_ZERO, FUA (the allocating write is on disk
//! when its reply arrives: `qemu-io -U` on the file sees it while the server still runs),
//! engine errors as NBD errnos, `--shared=N`, `--persistent` and the pid file.

use super::*;

/// One entry of `qemu-img map --output=json` of the file covering `off`: (zero, data,
/// allocated in the file).
fn at(path: &Path, off: u64) -> (bool, bool, bool) {
    let m = qemu_img(["map", "--output=json", "-U", "-f", "qcow2", &s(path)]).ok().json();
    for e in m.as_array().expect("map is an array") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (start..start + len).contains(&off) {
            return (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap(), e.get("offset").is_some());
        }
    }
    panic!("{off} not in the map of {}: {m}", path.display());
}

const CS: u64 = 65536;
/// Data written before each case: 0x61 over the first 8 MiB.
const DATA_END: u64 = 8 * MIB;

fn image(dir: &Path, name: &str, opts: &Qcow2Opts) -> PathBuf {
    let img = dir.join(format!("{name}.qcow2"));
    build_qcow2(&img, opts, 16 * MIB, &[format!("write -P 0x61 0 {DATA_END}")]);
    img
}

/// The requests every case sends, at fixed offsets (each one cluster unless said).
///   0: TRIM 1 MiB   1 MiB: WRITE of zeros   2 MiB: WRITE_ZEROES NO_HOLE
///   3 MiB: WRITE_ZEROES   4 MiB: WRITE_ZEROES FAST_ZERO   5 MiB + 512: FAST_ZERO, 512 bytes
fn send_cases(c: &mut Client, trim_frees: bool) {
    assert_eq!(c.call(CMD_TRIM, 0, 0, MIB as u32, &[]).unwrap().error, 0);
    assert_eq!(c.write(MIB, &[0u8; CS as usize], 0).unwrap(), 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_NO_HOLE, 2 * MIB, CS as u32, &[]).unwrap().error, 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 3 * MIB, CS as u32, &[]).unwrap().error, 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 4 * MIB, CS as u32, &[]).unwrap().error, 0);
    let r = c.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 5 * MIB + 512, 512, &[]).unwrap();
    assert_eq!(r.error, ENOTSUP, "FAST_ZERO inside a cluster: {r:?}");
    // What reads return, whatever the options.
    let trimmed = if trim_frees { 0 } else { 0x61 };
    for (off, want) in [(0, trimmed), (MIB - 512, trimmed), (MIB, 0), (2 * MIB, 0), (3 * MIB, 0), (4 * MIB, 0)] {
        assert_eq!(c.read(off, 512).unwrap().unwrap(), vec![want; 512], "read at {off}");
    }
    assert_eq!(c.read(5 * MIB, 4096).unwrap().unwrap(), vec![0x61; 4096], "refused FAST_ZERO changed data");
}

#[test]
fn discard_and_detect_zeroes_options() {
    let d = tempdir();
    let dir = d.path();
    // (options, then for each case offset: (zero, data, allocated) in the file's map).
    type Expect = [(u64, (bool, bool, bool)); 5];
    let cases: [(&str, &[&str], Expect); 3] = [
        (
            // TRIM ignored; zeros written as data; write-zeroes keep their clusters
            // (preallocated zero clusters: NO_HOLE or not, nothing is unmapped).
            "defaults",
            &[],
            [
                (0, (false, true, true)),
                (MIB, (false, true, true)),
                (2 * MIB, (true, false, true)),
                (3 * MIB, (true, false, true)),
                (4 * MIB, (true, false, true)),
            ],
        ),
        (
            // TRIM frees; a WRITE of zeros becomes a zero write that keeps its cluster;
            // WRITE_ZEROES frees unless NO_HOLE.
            "unmap-on",
            &["--discard=unmap", "--detect-zeroes=on"],
            [
                (0, (true, false, false)),
                (MIB, (true, false, true)),
                (2 * MIB, (true, false, true)),
                (3 * MIB, (true, false, false)),
                (4 * MIB, (true, false, false)),
            ],
        ),
        (
            // --detect-zeroes=unmap: the WRITE of zeros frees its cluster too.
            "unmap-unmap",
            &["--discard=unmap", "--detect-zeroes=unmap"],
            [
                (0, (true, false, false)),
                (MIB, (true, false, false)),
                (2 * MIB, (true, false, true)),
                (3 * MIB, (true, false, false)),
                (4 * MIB, (true, false, false)),
            ],
        ),
    ];
    for (name, opts, want) in cases {
        let img = image(dir, name, &Qcow2Opts::default());
        let srv = Server::start(dir, &img, false, opts);
        let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
        send_cases(&mut c, name != "defaults");
        c.disconnect();
        srv.stop_ok();
        check_clean(&img, false);
        for (off, w) in want {
            assert_eq!(at(&img, off), w, "[{name}] (zero, data, allocated) at {off}");
        }
        // Untouched data stays.
        assert_eq!(at(&img, 6 * MIB), (false, true, true), "[{name}]");
    }
}

#[test]
fn write_zeroes_granularity_extended_l2_and_v2() {
    let d = tempdir();
    let dir = d.path();
    // Extended L2 (32 subclusters of 2 KiB): FAST_ZERO works on whole subclusters.
    let img = image(dir, "ext", &Qcow2Opts { extended_l2: true, ..Default::default() });
    let srv = Server::start(dir, &img, false, &[]);
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, MIB + 2048, 4096, &[]).unwrap().error, 0);
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, MIB + 8192 + 512, 512, &[]).unwrap().error, ENOTSUP);
    assert_eq!(c.read(MIB, 8192).unwrap().unwrap(), [vec![0x61; 2048], vec![0; 4096], vec![0x61; 2048]].concat());
    c.disconnect();
    srv.stop_ok();
    check_clean(&img, false);
    // A v2 image has no zero flag: FAST_ZERO is not advertised and a request using it is
    // invalid; a plain WRITE_ZEROES still zeroes.
    let img = image(dir, "v2", &Qcow2Opts { compat: Compat::V010, ..Default::default() });
    let srv = Server::start(dir, &img, false, &[]);
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    const SEND_FAST_ZERO: u16 = 1 << 11;
    assert_eq!(c.flags & SEND_FAST_ZERO, 0, "FAST_ZERO advertised on a v2 image");
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, MIB, CS as u32, &[]).unwrap().error, EINVAL);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, MIB, CS as u32, &[]).unwrap().error, 0);
    assert_eq!(c.read(MIB, 4096).unwrap().unwrap(), vec![0; 4096]);
    c.disconnect();
    srv.stop_ok();
    check_clean(&img, false);
}

#[test]
fn fua_write_is_on_disk_at_its_reply() {
    let d = tempdir();
    let dir = d.path();
    let img = dir.join("fua.qcow2");
    create_qcow2(&img, &Qcow2Opts::default(), 16 * MIB);
    let srv = Server::start(dir, &img, false, &["--cache=writeback"]);
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    // Allocating writes with FUA: their L2 entries and refcounts are written before the
    // reply, so another reader of the file sees them while the server still runs.
    for i in 0..4u64 {
        assert_eq!(c.write(i * 3 * MIB + 4096, &[0x70 + i as u8; 8192], FLAG_FUA).unwrap(), 0);
    }
    for i in 0..4u64 {
        let r = qemu_io([
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0x{:02x} {} 8192", 0x70 + i, i * 3 * MIB + 4096),
            &s(&img),
        ])
        .ok();
        assert!(!r.stdout.contains("fail"), "FUA write {i} not on disk at its reply:\n{}", r.describe());
    }
    c.disconnect();
    srv.stop_ok();
    check_clean(&img, false);
}

#[test]
fn engine_errors_become_nbd_errnos() {
    let d = tempdir();
    let dir = d.path();
    let img = image(dir, "eio", &Qcow2Opts::default());
    // Every device flush fails with EIO: FLUSH and FUA writes get NBD_EIO, the connection
    // carries on, and the server's exit status reports the failed close.
    let srv = Server::start_env(dir, &img, false, &[], &[("QURING_INJECT_ERROR", "flush:EIO")]);
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).unwrap().error, EIO);
    let r = c.call(CMD_WRITE, FLAG_FUA, 0, 4096, &[0x71; 4096]).unwrap();
    assert_eq!(r.error, EIO, "{r:?}");
    assert!(!r.message.is_empty(), "an error chunk carries a message: {r:?}");
    // An allocating write: its metadata waits in the cache for the close's flush.
    assert_eq!(c.write(12 * MIB, &[0x72; 4096], 0).unwrap(), 0);
    assert_eq!(c.read(12 * MIB, 4096).unwrap().unwrap(), vec![0x72; 4096]);
    c.disconnect();
    let (code, log) = srv.stop(Duration::from_secs(60));
    assert_eq!(code, Some(1), "a failed close must fail the server:\n{log}");
    // Metadata writes (and flushes) fail with ENOSPC, writethrough: writes get NBD_ENOSPC
    // (allocating or not: each one's flush fails), reads still work.
    let img = image(dir, "enospc", &Qcow2Opts::default());
    let srv =
        Server::start_env(dir, &img, false, &["--cache=writethrough"], &[("QURING_INJECT_ERROR", "metadata:ENOSPC")]);
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    assert_eq!(c.write(12 * MIB, &[0x73; 4096], 0).unwrap(), ENOSPC);
    assert_eq!(c.write(0, &[0x74; 4096], 0).unwrap(), ENOSPC);
    assert_eq!(c.read(6 * MIB, 4096).unwrap().unwrap(), vec![0x61; 4096]);
    c.disconnect();
    let _ = srv.stop(Duration::from_secs(60));
}

#[test]
fn shared_persistent_and_pid_file() {
    let d = tempdir();
    let dir = d.path();
    let img = image(dir, "shared", &Qcow2Opts::default());
    let srv = Server::start(dir, &img, false, &["--shared=2"]);
    let pid = std::fs::read_to_string(&srv.pid_file).unwrap();
    assert_eq!(pid.trim(), srv.pid().to_string(), "pid file content");
    // Two connections at once, multi-conn advertised; a third waits for a slot.
    let mut a = Client::connect(&srv.addr, Want::default()).unwrap();
    let mut b = Client::connect(&srv.addr, Want::default()).unwrap();
    assert_ne!(a.flags & TFLAG_CAN_MULTI_CONN, 0, "--shared=2 advertises multi-conn");
    let mut third = Stream::connect(&srv.addr).unwrap();
    third.set_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut g = [0u8; 18];
    assert!(third.read_exact(&mut g).is_err(), "a third connection was served with --shared=2");
    // multi-conn: a write on one connection, flushed on the other, read on the other.
    assert_eq!(a.write(MIB, &[0x75; 4096], 0).unwrap(), 0);
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).unwrap().error, 0);
    assert_eq!(b.read(MIB, 4096).unwrap().unwrap(), vec![0x75; 4096]);
    a.disconnect();
    third.set_timeout(Some(Duration::from_secs(10))).unwrap();
    third.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g), NBDMAGIC, "the third connection is served once a slot is free");
    drop(third);
    b.disconnect();
    // --persistent (-t): every client gone, the server still serves.
    std::thread::sleep(Duration::from_millis(200));
    let mut srv = srv;
    assert!(srv.alive(), "the server left with --persistent: {}", srv.log_text());
    let mut c = Client::connect(&srv.addr, Want::default()).unwrap();
    assert_eq!(c.read(MIB, 4096).unwrap().unwrap(), vec![0x75; 4096]);
    c.disconnect();
    let pid_file = srv.pid_file.clone();
    srv.stop_ok();
    assert!(!pid_file.exists());
    check_clean(&img, false);
}
