//! Internal snapshots (issue 16, item 3): `quring snapshot -c|-a|-d|-l` against
//! `qemu-img snapshot` on twin images (v2 and v3, 512 B to 2 MiB clusters, extended L2,
//! refcount widths 1/16/64, compressed clusters, a backing file), each step done by quring
//! on one copy and by QEMU on the other: `qemu-img check` exit 0, the same guest content
//! (`qemu-img compare`) and the same snapshot contents (`qemu-img convert -l
//! snapshot.name=`), `qemu-img snapshot -l` identical but for the DATE column (creation
//! times differ by the seconds between the two runs). Then each tool applies and deletes the
//! snapshots the other made. Error cases: unknown names, a locked or shared-open image,
//! mixed options, a raw image, a refcount width too small.
//!
//! Crash consistency: create, apply and delete run through the library with the crash
//! harness's recorder; at every recorded write and flush a crash state is built (every
//! write issued so far, and a random subset of the writes not yet durable, some torn) and
//! must open, pass `qemu-img check` (leaks allowed; the one other complaint allowed is
//! COPIED still clear on a cluster whose refcount is already 1, see `crash_state_ok`), and
//! hold the old or the new guest content, every listed snapshot its own content.

mod common;
mod crash_harness;

use common::*;
use std::path::{Path, PathBuf};

struct Twin {
    _dir: tempfile::TempDir,
    /// The copy quring works on.
    q: PathBuf,
    /// The copy QEMU works on.
    e: PathBuf,
    dir: PathBuf,
}

/// Two identical images built by qemu-img/qemu-io.
fn twin(opts: &Qcow2Opts, size: u64, setup: &[String], backing: bool) -> Twin {
    let d = tempdir();
    let dir = d.path().to_path_buf();
    let mut opts = opts.clone();
    if backing {
        let b = dir.join("base.qcow2");
        build_qcow2(
            &b,
            &Qcow2Opts::cluster(65536),
            size,
            &[format!("write -P 0x5a 0 {}", size / 2), format!("write -P 0x5b {} 64k", size - 65536)],
        );
        opts.backing = Some(("base.qcow2".into(), "qcow2".into()));
    }
    let q = dir.join("q.qcow2");
    let e = dir.join("e.qcow2");
    build_qcow2(&q, &opts, size, setup);
    std::fs::copy(&q, &e).unwrap();
    Twin { _dir: d, q, e, dir }
}

/// `qemu-img check` exit 0.
#[track_caller]
fn check_clean(p: &Path) {
    let r = qemu_img(["check", &s(p)]);
    assert_eq!(r.code, Some(0), "qemu-img check of {}:\n{}", p.display(), r.describe());
}

/// The snapshot list without the DATE column (the two runs create at different seconds).
fn list_without_dates(p: &Path, tool: &str) -> String {
    let r = if tool == "qemu" { qemu_img(["snapshot", "-l", &s(p)]) } else { quring(["snapshot", "-l", &s(p)]) };
    assert_eq!(r.code, Some(0), "{}", r.describe());
    r.stdout
        .lines()
        .map(|l| {
            // "ID TAG VM_SIZE DATE(19) VM_CLOCK ICOUNT": the DATE spans columns 34..53.
            if l.len() >= 53 && !l.starts_with("ID") && !l.starts_with("Snapshot") {
                format!("{}<date>{}", &l[..34], &l[53..])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The guest content of snapshot `name` as a raw file.
fn snapshot_raw(p: &Path, name: &str, out: &Path) {
    qemu_img(["convert", "-f", "qcow2", "-l", &format!("snapshot.name={name}"), "-O", "raw", &s(p), &s(out)]).ok();
}

#[track_caller]
fn same_snapshot(t: &Twin, a: &Path, b: &Path, name: &str) {
    let (ra, rb) = (t.dir.join("ra.raw"), t.dir.join("rb.raw"));
    snapshot_raw(a, name, &ra);
    snapshot_raw(b, name, &rb);
    assert!(raw_bytes_equal(&ra, &rb), "snapshot {name} differs between {} and {}", a.display(), b.display());
}

#[track_caller]
fn same_content(a: &Path, b: &Path) {
    let r = qemu_img(["compare", "-f", "qcow2", "-F", "qcow2", &s(a), &s(b)]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
}

/// One snapshot step on both copies: quring on `t.q`, qemu-img on `t.e`.
#[track_caller]
fn both(t: &Twin, flag: &str, name: &str) {
    let a = quring(["snapshot", flag, name, &s(&t.q)]);
    let b = qemu_img(["snapshot", flag, name, &s(&t.e)]);
    assert_eq!(
        (a.code, a.stderr.replace("quring:", "qemu-img:")),
        (b.code, b.stderr.clone()),
        "quring:\n{}\nqemu-img:\n{}",
        a.describe(),
        b.describe()
    );
    assert_eq!(a.stdout, b.stdout);
}

/// Guest writes on both copies (quring io on quring's copy, qemu-io on QEMU's).
#[track_caller]
fn write_both(t: &Twin, cmds: &[&str]) {
    let mut args = vec![];
    for c in cmds {
        args.push("-c".to_string());
        args.push(c.to_string());
    }
    let mut qa = args.clone();
    qa.push(s(&t.q));
    quring(std::iter::once("io".to_string()).chain(qa)).ok();
    let mut ea = vec!["-f".to_string(), "qcow2".into()];
    ea.extend(args);
    ea.push(s(&t.e));
    qemu_io(&ea).ok();
}

/// The whole differential sequence on one configuration.
fn sequence(opts: Qcow2Opts, size: u64, backing: bool) {
    let cs = opts.cluster_size as u64;
    let c2 = cs * 2;
    let compressible = opts.cluster_size >= 4096;
    let mut setup = vec![format!("write -P 1 0 {}", size / 4), format!("write -z {} {c2}", size / 2)];
    if compressible {
        // Compressed clusters: several share a host cluster (counted per host cluster).
        setup.push(format!("write -c -P 7 {} {c2}", size / 2 + 4 * cs));
    }
    let t = twin(&opts, size, &setup, backing);
    let ctx = format!("{opts:?} size {size} backing {backing}");

    both(&t, "-c", "s1");
    check_clean(&t.q);
    write_both(&t, &[&format!("write -P 2 {cs} {c2}"), &format!("write -P 3 {} 8k", size - 8192), "discard 0 4k"]);
    both(&t, "-c", "s2");
    write_both(&t, &[&format!("write -z 0 {c2}"), &format!("write -P 4 {} {c2}", size / 2)]);
    check_clean(&t.q);
    same_content(&t.q, &t.e);
    assert_eq!(list_without_dates(&t.q, "qemu"), list_without_dates(&t.e, "qemu"), "{ctx}");
    assert_eq!(list_without_dates(&t.q, "quring"), list_without_dates(&t.e, "qemu"), "{ctx}");
    // The same file listed by both tools: the same text, dates included.
    for p in [&t.q, &t.e] {
        let a = quring(["snapshot", "-l", &s(p)]);
        let b = qemu_img(["snapshot", "-l", &s(p)]);
        assert_eq!((a.code, &a.stdout, &a.stderr), (b.code, &b.stdout, &b.stderr), "{ctx}");
    }
    for n in ["s1", "s2"] {
        same_snapshot(&t, &t.q, &t.e, n);
    }

    both(&t, "-a", "s1");
    check_clean(&t.q);
    same_content(&t.q, &t.e);
    write_both(&t, &[&format!("write -P 5 {} {cs}", cs * 3)]);
    both(&t, "-c", "s3");
    both(&t, "-d", "s1");
    check_clean(&t.q);
    same_content(&t.q, &t.e);
    assert_eq!(list_without_dates(&t.q, "quring"), list_without_dates(&t.e, "qemu"), "{ctx}");
    for n in ["s2", "s3"] {
        same_snapshot(&t, &t.q, &t.e, n);
    }
    // By ID: "2" is s2's.
    both(&t, "-a", "2");
    same_content(&t.q, &t.e);
    check_clean(&t.q);

    // Each applies and deletes the other's snapshots.
    let x = t.dir.join("x.qcow2");
    let y = t.dir.join("y.qcow2");
    std::fs::copy(&t.q, &x).unwrap();
    std::fs::copy(&t.e, &y).unwrap();
    qemu_img(["snapshot", "-a", "s3", &s(&x)]).ok();
    quring(["snapshot", "-a", "s3", &s(&y)]).ok();
    check_clean(&x);
    check_clean(&y);
    same_content(&x, &y);
    qemu_img(["snapshot", "-d", "s2", &s(&x)]).ok();
    quring(["snapshot", "-d", "s2", &s(&y)]).ok();
    check_clean(&x);
    check_clean(&y);
    same_content(&x, &y);
    same_snapshot(&t, &x, &y, "s3");
    qemu_img(["snapshot", "-d", "s3", &s(&x)]).ok();
    quring(["snapshot", "-d", "s3", &s(&y)]).ok();
    check_clean(&x);
    check_clean(&y);
    same_content(&x, &y);
    assert_eq!(qemu_img(["snapshot", "-l", &s(&y)]).ok().stdout, "");
    // After every snapshot is gone, writes are in place again (COPIED exact): the file does
    // not grow on an overwrite.
    let before = std::fs::metadata(&y).unwrap().len();
    quring(["io", "-c", &format!("write -P 9 0 {cs}"), &s(&y)]).ok();
    assert_eq!(
        std::fs::metadata(&y).unwrap().len(),
        before,
        "{ctx}: an overwrite after deleting all snapshots allocated"
    );
    check_clean(&y);
}

#[test]
fn v3_64k() {
    sequence(Qcow2Opts::cluster(65536), 8 << 20, false);
}

#[test]
fn v2_64k() {
    sequence(Qcow2Opts { compat: Compat::V010, ..Qcow2Opts::cluster(65536) }, 8 << 20, false);
}

#[test]
fn v3_512() {
    sequence(Qcow2Opts::cluster(512), 1 << 20, false);
}

#[test]
fn v3_2m() {
    sequence(Qcow2Opts::cluster(2 << 20), 32 << 20, false);
}

#[test]
fn extended_l2_backing() {
    sequence(Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(65536) }, 8 << 20, true);
}

#[test]
fn refcount_64_4k_backing() {
    sequence(Qcow2Opts { refcount_bits: 64, ..Qcow2Opts::cluster(4096) }, 4 << 20, true);
}

#[test]
fn lazy_refcounts() {
    sequence(Qcow2Opts { lazy_refcounts: true, ..Qcow2Opts::cluster(65536) }, 8 << 20, false);
}

/// The file quring writes for a snapshot step is QEMU's, byte for byte, but for the
/// creation time (date_sec/date_nsec of each entry) and the end of the file (QEMU leaves
/// the last sector of a table at the end of the file short; quring writes whole sectors).
#[test]
fn same_bytes_as_qemu() {
    for compat in [Compat::V010, Compat::V11] {
        let opts = Qcow2Opts { compat, ..Qcow2Opts::cluster(65536) };
        let t = twin(&opts, 8 << 20, &["write -P 1 0 1M".into(), "write -c -P 2 2M 128k".into()], false);
        for (flag, name) in [("-c", "one"), ("-c", "two"), ("-a", "one"), ("-d", "two"), ("-c", "three"), ("-d", "one")]
        {
            both(&t, flag, name);
            let mut a = std::fs::read(&t.q).unwrap();
            let b = std::fs::read(&t.e).unwrap();
            // Copy QEMU's dates into quring's table entries.
            let be32 = |v: &[u8], o: usize| u32::from_be_bytes(v[o..o + 4].try_into().unwrap()) as usize;
            let be16 = |v: &[u8], o: usize| u16::from_be_bytes(v[o..o + 2].try_into().unwrap()) as usize;
            let (n, mut off) = (be32(&b, 60), u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize);
            for _ in 0..n {
                a[off + 16..off + 24].copy_from_slice(&b[off + 16..off + 24]);
                off += (40 + be32(&b, off + 36) + be16(&b, off + 12) + be16(&b, off + 14)).div_ceil(8) * 8;
            }
            assert!(a.len() >= b.len() && a.len() - b.len() < 512 && a[b.len()..].iter().all(|&x| x == 0));
            let diff = a[..b.len()].iter().zip(&b).position(|(x, y)| x != y);
            assert_eq!(diff, None, "{compat:?} after {flag} {name}: files differ at byte {diff:?}");
        }
    }
}

#[test]
fn v2_512_backing() {
    sequence(Qcow2Opts { compat: Compat::V010, ..Qcow2Opts::cluster(512) }, 1 << 20, true);
}

/// 1-bit refcounts cannot count a second reference: both tools fail with "Invalid
/// argument", exit 1 (QEMU leaves leaked clusters behind, quring checks before writing and
/// leaves the image unchanged); an empty image can still take a snapshot.
#[test]
fn refcount_1() {
    let opts = Qcow2Opts { refcount_bits: 1, ..Qcow2Opts::cluster(65536) };
    let t = twin(&opts, 4 << 20, &["write -P 1 0 128k".into()], false);
    both(&t, "-c", "s1");
    check_clean(&t.q);
    assert_eq!(qemu_img(["check", &s(&t.e)]).code, Some(3), "QEMU's failed snapshot leaks");
    assert_eq!(qemu_img(["snapshot", "-l", &s(&t.q)]).ok().stdout, "");
    let t = twin(&opts, 4 << 20, &[], false);
    both(&t, "-c", "s1");
    check_clean(&t.q);
    assert_eq!(list_without_dates(&t.q, "quring"), list_without_dates(&t.e, "qemu"));
    write_both(&t, &["write -P 3 0 64k"]);
    both(&t, "-a", "s1");
    same_content(&t.q, &t.e);
    both(&t, "-d", "s1");
    check_clean(&t.q);
    same_content(&t.q, &t.e);
}

/// Duplicate names are accepted (each gets the next ID; the name then finds the first);
/// unknown names and IDs fail as qemu-img's do.
#[test]
fn names_and_errors() {
    let t = twin(&Qcow2Opts::cluster(65536), 4 << 20, &["write -P 1 0 64k".into()], false);
    both(&t, "-c", "dup");
    both(&t, "-c", "dup");
    assert_eq!(list_without_dates(&t.q, "quring"), list_without_dates(&t.e, "qemu"));
    both(&t, "-a", "nope");
    both(&t, "-d", "nope");
    both(&t, "-d", "dup");
    both(&t, "-d", "dup");
    both(&t, "-d", "dup");
    both(&t, "-d", "1");
    check_clean(&t.q);
    // No action lists; an empty list prints nothing.
    let a = quring(["snapshot", &s(&t.q)]);
    let b = qemu_img(["snapshot", &s(&t.e)]);
    assert_eq!((a.code, a.stdout), (b.code, b.stdout));
    // -q does not hide the list.
    both(&t, "-c", "q");
    let a = quring(["snapshot", "-q", "-l", &s(&t.q)]);
    let b = qemu_img(["snapshot", "-q", "-l", &s(&t.e)]);
    assert_eq!(a.code, b.code);
    assert_eq!(a.stdout.lines().count(), b.stdout.lines().count());
    // Mixed actions.
    let a = quring(["snapshot", "-l", "-c", "x", &s(&t.q)]);
    let b = qemu_img(["snapshot", "-l", "-c", "x", &s(&t.e)]);
    assert_eq!(a.code, b.code);
    assert_eq!(
        a.stderr.lines().next().map(|l| l.replace("quring:", "qemu-img:")),
        b.stderr.lines().next().map(String::from)
    );
    // -U only with -l.
    let a = quring(["snapshot", "-U", "-c", "x", &s(&t.q)]);
    let b = qemu_img(["snapshot", "-U", "-c", "x", &s(&t.e)]);
    assert_eq!(
        (a.code, a.stderr.replace("quring:", "qemu-img:").replace(&s(&t.q), "IMG")),
        (b.code, b.stderr.replace(&s(&t.e), "IMG"))
    );
    // A raw image has no snapshots.
    let r = t.dir.join("r.raw");
    build_raw(&r, 1 << 20, &[]);
    for (flag, name) in [("-c", "x"), ("-a", "x"), ("-d", "x"), ("-l", "")] {
        let mut args = vec!["snapshot", flag];
        if !name.is_empty() {
            args.push(name);
        }
        let p = s(&r);
        args.push(&p);
        let a = quring(&args);
        let b = qemu_img(&args);
        assert_eq!((a.code, a.stdout), (b.code, b.stdout), "{args:?}");
        assert_eq!(a.stderr.replace("quring:", "qemu-img:"), b.stderr, "{args:?}");
    }
}

/// An image another process has open for writing: the write lock is refused, as qemu-img
/// refuses it; listing needs -U there.
#[test]
fn locked_image() {
    let t = twin(&Qcow2Opts::cluster(65536), 4 << 20, &[], false);
    for p in [&t.q, &t.e] {
        let holder = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 3000", &s(p)])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut holder = holder;
        let a = quring(["snapshot", "-c", "x", &s(p)]);
        let b = qemu_img(["snapshot", "-c", "x", &s(p)]);
        assert_eq!(a.code, Some(1));
        assert_eq!(a.stderr.replace("quring:", "qemu-img:"), b.stderr, "{}", a.describe());
        let a = quring(["snapshot", "-l", &s(p)]);
        let b = qemu_img(["snapshot", "-l", &s(p)]);
        assert_eq!((a.code, a.stderr.replace("quring:", "qemu-img:")), (b.code, b.stderr));
        assert_eq!(quring(["snapshot", "-U", "-l", &s(p)]).code, Some(0));
        let _ = holder.kill();
        let _ = holder.wait();
    }
}

/// The library on an image open read-only refuses every change; listing works.
#[test]
fn library_read_only() {
    let t = twin(&Qcow2Opts::cluster(65536), 4 << 20, &["write -P 1 0 64k".into()], false);
    qemu_img(["snapshot", "-c", "s1", &s(&t.q)]).ok();
    let img =
        quring::image::Image::open(&t.q, &quring::image::Options { read_only: true, ..Default::default() }).unwrap();
    assert_eq!(img.snapshots().len(), 1);
    let e = img.create_snapshot(&quring::image::NewSnapshot::named("x")).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(img.apply_snapshot("s1").unwrap_err().to_string().contains("read-only"));
    assert!(img.delete_snapshot("s1").unwrap_err().to_string().contains("read-only"));
    drop(img);
    check_clean(&t.q);
}

/// The library on an image with running queues: a VMM pauses them (no request in flight)
/// and snapshots between requests; the queues keep working after, with copy-on-write of the
/// shared clusters, and what the VMM recorded (VM clock, icount) is listed by qemu-img.
#[test]
fn library_between_requests() {
    use quring::image::{Image, NewSnapshot, Options};
    use quring::queue::{Queue, QueueOptions};
    let d = tempdir();
    let p = d.path().join("vm.qcow2");
    create_qcow2(&p, &Qcow2Opts::cluster(65536), 8 << 20);
    let img = Image::open(&p, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    q.write_at(&vec![1u8; 1 << 20], 0).unwrap();
    // A request in flight: the operation is refused and changes nothing.
    let mut rbuf = vec![0u8; 4096];
    // SAFETY: rbuf outlives the request, reaped below.
    unsafe {
        q.submit(quring::queue::Request {
            op: quring::queue::Op::Read { offset: 0, buf: rbuf.as_mut_ptr(), len: 4096 },
            user_data: 7,
        })
    }
    .unwrap();
    let e = img.create_snapshot(&NewSnapshot::named("early")).unwrap_err();
    assert!(e.to_string().contains("idle queues"), "{e}");
    assert!(img.snapshots().is_empty());
    let mut done = Vec::new();
    q.commit().unwrap();
    while done.is_empty() {
        q.reap(&mut done, 1, None).unwrap();
    }
    assert_eq!(rbuf, vec![1u8; 4096]);
    let mut snap = NewSnapshot::named("vm1");
    snap.vm_clock_nsec = 3_723_004_000_000; // 1 h 2 min 3.004 s
    snap.icount = Some(12345);
    let sn = img.create_snapshot(&snap).unwrap();
    assert_eq!((sn.id.as_str(), sn.disk_size(), sn.icount()), ("1", Some(8 << 20), Some(12345)));
    q.write_at(&vec![2u8; 64 << 10], 0).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 2) && buf[64 << 10..].iter().all(|&b| b == 1));
    img.apply_snapshot("vm1").unwrap();
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "after apply the queue reads the snapshot's data");
    q.write_at(&vec![3u8; 4096], 4096).unwrap();
    drop(q);
    // The engine's own audit (refcounts = references, cached metadata = disk) after each
    // operation.
    let audit = |what: &str| {
        let r = img.audit().unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "audit after {what}: {:?}", r.messages);
    };
    audit("apply");
    img.create_snapshot(&NewSnapshot::named("vm2")).unwrap();
    audit("create");
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    q.write_at(&vec![4u8; 64 << 10], 64 << 10).unwrap();
    drop(q);
    img.delete_snapshot("vm2").unwrap();
    audit("delete");
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    let l = qemu_img(["snapshot", "-l", &s(&p)]).ok().stdout;
    let line = l.lines().nth(2).unwrap();
    assert!(line.starts_with("1       vm1 "), "{l}");
    assert!(line.ends_with("0001:02:03.004      12345"), "{l}");
}

// ---------------------------------------------------------------------------
// Crash consistency

use crash_harness::{Ev, Log, Recorder, harness_rng, materialize, open_recorded, read_disk};

/// `qemu-img check` of a crash state: exit 0 or 3 (leaks), or exit 2 where every error is
/// "OFLAG_COPIED ... refcount=1": a cluster whose refcount already dropped to 1 (a delete
/// or apply that freed its other reference) before the pass that sets COPIED again was
/// durable (or, in a create, COPIED cleared before the increments are). That is the
/// harmless direction (a write there copies instead of writing in place, and frees the old
/// cluster); QEMU's own delete and apply leave the same state when interrupted at that
/// point (its create leaves the opposite one, COPIED on refcount 2, until the L2 tables are
/// written), and `qemu-img check -r all` repairs it (checked here).
/// COPIED on a cluster with refcount 2 (a write in place would change a snapshot) never
/// passes. Returns whether the state had the COPIED complaint.
fn crash_state_ok(p: &Path) -> Result<bool, String> {
    let r = qemu_img(["check", &s(p)]);
    match r.code {
        Some(0) | Some(3) => Ok(false),
        Some(2) => {
            let errors: Vec<&str> = r.stderr.lines().chain(r.stdout.lines()).filter(|l| l.contains("ERROR")).collect();
            if errors.iter().all(|l| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with("refcount=1")) {
                let fixed = p.with_extension("fixed");
                std::fs::copy(p, &fixed).unwrap();
                let f = qemu_img(["check", "-r", "all", &s(&fixed)]);
                let again = qemu_img(["check", &s(&fixed)]);
                if !matches!(again.code, Some(0) | Some(3)) {
                    return Err(format!("check -r all did not repair:\n{}\n{}", f.describe(), again.describe()));
                }
                Ok(true)
            } else {
                Err(format!("qemu-img check found corruption:\n{}", r.describe()))
            }
        }
        _ => Err(format!("qemu-img check failed:\n{}", r.describe())),
    }
}

/// What a crash state may hold: the active content (old or new) and each snapshot's.
struct Expect {
    active: Vec<Vec<u8>>,
    snaps: Vec<(String, Vec<u8>)>,
    /// Snapshots that must be listed in every state.
    always: Vec<String>,
}

fn raw_of(p: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("snap.raw");
    snapshot_raw(p, name, &out);
    std::fs::read(&out).unwrap()
}

/// Runs `op` on `img_path` through the library with the recorder, then checks a crash
/// state at every recorded write and flush. Returns (states checked, states with the
/// COPIED complaint).
fn crash_op(img_path: &Path, op: &dyn Fn(&quring::image::Image), expect: &Expect, seed: u64) -> (usize, usize) {
    let start = std::fs::read(img_path).unwrap();
    let rec = Recorder::new();
    let img = open_recorded(img_path, &rec, quring::image::CacheMode::Writeback);
    let mark = rec.len();
    op(&img);
    img.close().unwrap();
    drop(img);
    let events = rec.events();
    let log = Log::new(&events);
    let dir = img_path.parent().unwrap();
    let state = dir.join("state.qcow2");
    let mut rng = harness_rng(seed);
    let (mut n, mut copied) = (0, 0);
    for c in mark..=events.len() {
        if c > mark && !matches!(events[c - 1], Ev::Write { .. } | Ev::FlushDone { .. }) {
            continue;
        }
        // Every write issued before the crash point, whole; then a random subset.
        let mut prefix = start.clone();
        for w in log.writes.iter().filter(|w| w.issued_at < c) {
            let end = (w.off + w.len) as usize;
            if prefix.len() < end {
                prefix.resize(end, 0);
            }
            match &w.data {
                Some(d) => prefix[w.off as usize..end].copy_from_slice(d),
                None => prefix[w.off as usize..end].fill(0),
            }
        }
        // A random subset at every other point (each state costs a check and conversions).
        let (random, desc) = materialize(&start, &log, c, &mut rng);
        let mut states = vec![("prefix", prefix)];
        if (c - mark) % 2 == 1 {
            states.push(("random", random));
        }
        for (what, bytes) in states {
            std::fs::write(&state, &bytes).unwrap();
            let ctx = || format!("{what} crash state at event {c} of {} (seed {seed})\n{desc}", events.len());
            let bad = match crash_state_ok(&state) {
                Ok(b) => b,
                Err(e) => panic!("{}: {e}", ctx()),
            };
            copied += bad as usize;
            let disk = read_disk(&state).unwrap_or_else(|e| panic!("{}: {e}", ctx()));
            assert!(expect.active.contains(&disk), "{}: the guest content is neither the old nor the new one", ctx());
            let listed = quring::image::Image::open(
                &state,
                &quring::image::Options { read_only: true, force_share: true, ..Default::default() },
            )
            .unwrap()
            .snapshots();
            for a in &expect.always {
                assert!(listed.iter().any(|l| &l.name == a), "{}: snapshot {a} is gone", ctx());
            }
            for l in &listed {
                let (_, want) = expect
                    .snaps
                    .iter()
                    .find(|(n, _)| *n == l.name)
                    .unwrap_or_else(|| panic!("{}: unexpected snapshot {}", ctx(), l.name));
                assert!(raw_of(&state, &l.name, dir) == *want, "{}: snapshot {} has other content", ctx(), l.name);
            }
            n += 1;
        }
    }
    (n, copied)
}

fn crash_config(opts: Qcow2Opts, size: u64, seed: u64) {
    crash_config_with(opts, size, seed, false)
}

fn crash_config_with(opts: Qcow2Opts, size: u64, seed: u64, backing: bool) {
    let cs = opts.cluster_size as u64;
    let t = twin(
        &opts,
        size,
        &[format!("write -P 1 0 {}", size / 4), format!("write -c -P 6 {} {}", size / 2, 2 * cs.max(4096))],
        backing,
    );
    let base = &t.e;
    qemu_img(["snapshot", "-c", "s1", &s(base)]).ok();
    qemu_io_cmds(base, "qcow2", &[format!("write -P 2 {cs} {}", 3 * cs), format!("write -z {} {cs}", 8 * cs)]);
    let active = read_disk(base).unwrap();
    let s1 = raw_of(base, "s1", &t.dir);
    let mut total = (0, 0);
    let mut add = |r: (usize, usize)| {
        eprintln!("  {} states, {} with COPIED still clear on refcount 1", r.0, r.1);
        total.0 += r.0;
        total.1 += r.1;
    };

    // create s2: the active content stays; s2 (if listed) holds it.
    let p = t.dir.join("c.qcow2");
    std::fs::copy(base, &p).unwrap();
    let e = Expect {
        active: vec![active.clone()],
        snaps: vec![("s1".into(), s1.clone()), ("s2".into(), active.clone())],
        always: vec!["s1".into()],
    };
    add(crash_op(
        &p,
        &|img| {
            img.create_snapshot(&quring::image::NewSnapshot::named("s2")).unwrap();
        },
        &e,
        seed,
    ));

    // apply s1: the old or the snapshot's content.
    let p = t.dir.join("a.qcow2");
    std::fs::copy(base, &p).unwrap();
    let e = Expect {
        active: vec![active.clone(), s1.clone()],
        snaps: vec![("s1".into(), s1.clone())],
        always: vec!["s1".into()],
    };
    add(crash_op(&p, &|img| img.apply_snapshot("s1").unwrap(), &e, seed + 1));

    // delete s1 (with a second snapshot that shares clusters with it and the active disk).
    let p = t.dir.join("d.qcow2");
    std::fs::copy(base, &p).unwrap();
    qemu_img(["snapshot", "-c", "s2", &s(&p)]).ok();
    let e = Expect {
        active: vec![active.clone()],
        snaps: vec![("s1".into(), s1.clone()), ("s2".into(), active.clone())],
        always: vec!["s2".into()],
    };
    add(crash_op(&p, &|img| img.delete_snapshot("s1").unwrap(), &e, seed + 2));

    // delete the only snapshot: the clusters it shared with the active disk become private
    // again (refcount 2 -> 1, COPIED set again).
    let p = t.dir.join("d1.qcow2");
    std::fs::copy(base, &p).unwrap();
    let e = Expect { active: vec![active.clone()], snaps: vec![("s1".into(), s1.clone())], always: vec![] };
    add(crash_op(&p, &|img| img.delete_snapshot("s1").unwrap(), &e, seed + 3));
    eprintln!(
        "{opts:?} backing {backing}: {} crash states checked (create, apply, delete, delete of the last above), {} with COPIED still clear on refcount 1",
        total.0, total.1
    );
    assert!(total.0 > 30);
}

#[test]
fn crash_4k() {
    crash_config(Qcow2Opts::cluster(4096), 1 << 20, 1);
}

#[test]
fn crash_32k_extended_l2_backing() {
    crash_config_with(Qcow2Opts { extended_l2: true, ..Qcow2Opts::cluster(32768) }, 2 << 20, 41, true);
}

#[test]
fn crash_v2_64k() {
    crash_config(Qcow2Opts { compat: Compat::V010, ..Qcow2Opts::cluster(65536) }, 4 << 20, 11);
}

#[test]
fn crash_512_rb64() {
    crash_config(Qcow2Opts { refcount_bits: 64, ..Qcow2Opts::cluster(512) }, 256 << 10, 21);
}

/// A corrupt tree (an L2 entry past the end of the file, a snapshot L1 table outside the
/// file) fails the operation with an error naming the field, before anything is written.
#[test]
fn corrupt_trees_refused() {
    let t = twin(&Qcow2Opts::cluster(65536), 4 << 20, &["write -P 1 0 64k".into()], false);
    let p = &t.q;
    let be64 = |off: u64| u64::from_be_bytes(read_bytes(p, off, 8).try_into().unwrap());
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    patch_be64(p, l2 + 8, 0x8000_0000_0000_0000 | (1 << 40));
    let before = std::fs::read(p).unwrap();
    let r = quring(["snapshot", "-c", "x", &s(p)]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert!(r.stderr.contains("L2 entry") && r.stderr.contains("past the end of the file"), "{}", r.describe());
    assert_eq!(std::fs::read(p).unwrap(), before, "a refused snapshot changed the file");

    // A snapshot whose L1 table lies outside the file.
    let p = &t.e;
    qemu_img(["snapshot", "-c", "s1", &s(p)]).ok();
    let table = u64::from_be_bytes(read_bytes(p, 64, 8).try_into().unwrap());
    patch_be64(p, table, 1 << 40);
    for flag in ["-a", "-d"] {
        let r = quring(["snapshot", flag, "s1", &s(p)]);
        assert_eq!(r.code, Some(1), "{}", r.describe());
        assert!(r.stderr.contains("snapshot L1"), "{}", r.describe());
    }
}

/// A VMM that does not pause its queues: snapshot operations racing with a writer thread
/// either run with no request in flight or fail without changing anything, and requests
/// submitted meanwhile are refused; afterwards the engine's audit and `qemu-img check` are
/// clean and the queues work on.
#[test]
fn racing_writer_is_refused_not_corrupting() {
    use quring::image::{Image, NewSnapshot, Options};
    use quring::queue::{Queue, QueueOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let d = tempdir();
    let p = d.path().join("race.qcow2");
    create_qcow2(&p, &Qcow2Opts::cluster(65536), 4 << 20);
    let img = Image::open(&p, &Options::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Writes that went through so far: every operation waits for a new one, so that writes
    // (copies of snapshot-shared clusters, whose old clusters' decrements the writer's queue
    // owes) land between any two operations even when the scheduler favours one thread.
    let oks = Arc::new(AtomicU64::new(0));
    let writer = {
        let img = img.clone();
        let stop = stop.clone();
        let oks = oks.clone();
        std::thread::spawn(move || {
            let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
            let (mut ok, mut refused) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let block = (i * 7) % 64;
                let v = (i % 250) as u8 + 1;
                match q.write_at(&vec![v; 64 << 10], block * (64 << 10)) {
                    Ok(()) => {
                        ok += 1;
                        oks.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        assert!(e.to_string().contains("snapshot operation is running"), "{e}");
                        refused += 1;
                    }
                }
                i += 1;
            }
            (ok, refused)
        })
    };
    let (mut done, mut busy) = (0, 0);
    let mut seen = 0;
    for k in 0..9 {
        let t0 = std::time::Instant::now();
        while oks.load(Ordering::SeqCst) == seen {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(120),
                "the writer made no progress before operation {k}"
            );
            std::thread::yield_now();
        }
        seen = oks.load(Ordering::SeqCst);
        // Retried until it finds the writer between two requests.
        for attempt in 0.. {
            assert!(attempt < 200_000, "operation {k} never found the queue idle");
            let r = match k % 3 {
                0 => img.create_snapshot(&NewSnapshot::named(&format!("r{k}"))).map(|_| ()),
                1 => img.apply_snapshot(&format!("r{}", k - 1)),
                _ => img.delete_snapshot(&format!("r{}", k - 2)),
            };
            match r {
                Ok(()) => {
                    done += 1;
                    break;
                }
                Err(e) if e.to_string().contains("idle queues") => busy += 1,
                Err(e) => panic!("{e}"),
            }
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, refused) = writer.join().unwrap();
    eprintln!("{done} snapshot operations ran, {busy} found requests in flight; writes: {ok} ok, {refused} refused");
    assert!(done == 9 && ok > 0);
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    q.write_at(&vec![0xee; 64 << 10], 0).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xee));
    drop(q);
    let r = img.audit().unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{:?}", r.messages);
    img.close().unwrap();
    drop(img);
    check_clean(&p);
}
