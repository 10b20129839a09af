//! Metadata overlap checks, as QEMU's `qcow2_check_metadata_overlap` and
//! `qcow2_signal_corruption` behave: an L2 entry (standard, extended,
//! zero-with-offset or compressed), an L1 entry or a refcount table entry that
//! points into the header cluster, the L1 table, the refcount table, a refcount
//! block, another L2 table or past the end of the file is refused before any
//! write uses it. The write fails naming the entry, the guest and host offsets
//! and what is there; no byte of the image changes except the corrupt bit
//! (incompatible bit 1), which `qemu-img info` then reports; `qemu-img check`
//! finds the corruption; a read of the mapping fails instead of returning
//! metadata; the image opens read-only only.
//!
//! Images are built with qemu-img/qemu-io (1 GiB, 64 KiB clusters, 64 KiB of
//! 0xab written at 0 and at 512 MiB, so that there are two L2 tables) and
//! corrupted with a direct byte edit.

mod common;

use common::corpus::{H_INCOMPAT, l1_offset, l2_offset, refblock_offset, rt_offset};
use common::*;
use std::path::{Path, PathBuf};

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const CORRUPT_BIT: u64 = 1 << 1;
/// Far past the end of the (512 KiB) test images.
const PAST_EOF: u64 = 0x1000_0000;

/// A test image and the directory holding it.
struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn base(extended_l2: bool) -> Img {
    let dir = tempdir();
    let path = dir.path().join("base.qcow2");
    build_qcow2(
        &path,
        &Qcow2Opts { extended_l2, ..Default::default() },
        1 << 30,
        &["write -P 0xab 0 64k".into(), "write -P 0xab 512M 64k".into()],
    );
    // The layout the cases rely on (qemu-img 10).
    assert_eq!(l1_offset(&path), 0x30000);
    assert_eq!(l2_offset(&path), 0x40000);
    assert_eq!(read_be64(&path, l2_offset(&path)) & !COPIED, 0x50000);
    Img { _dir: dir, path }
}

/// The L2 table of the second L1 entry (guest 512 MiB).
fn second_l2(p: &Path) -> u64 {
    read_be64(p, l1_offset(p) + 8) & 0x00ff_ffff_ffff_fe00
}

/// A compressed cluster descriptor (64 KiB clusters: offset in bits 0..53) for
/// `sectors` 512-byte sectors at byte offset `host`.
fn compressed(host: u64, sectors: u64) -> u64 {
    COMPRESSED | (sectors - 1) << 54 | host
}

/// The whole file, with the incompatible feature field zeroed.
fn bytes_but_incompat(p: &Path) -> Vec<u8> {
    let mut b = std::fs::read(p).unwrap();
    b[H_INCOMPAT as usize..H_INCOMPAT as usize + 8].fill(0);
    b
}

fn qemu_corrupt_flag(p: &Path) -> bool {
    let info = qemu_img(["info", "--output=json", &s(p)]).ok().json();
    info["format-specific"]["data"]["corrupt"]
        .as_bool()
        .unwrap_or_else(|| panic!("no corrupt flag in qemu-img info: {info}"))
}

fn lower(r: &Run) -> String {
    r.stderr.to_lowercase()
}

/// What a case does to the base image and what the messages must name.
struct Case {
    name: &'static str,
    extended_l2: bool,
    /// Patches the image; returns where the metadata the bad entry points at
    /// lies, when it is inside the file (offset, length).
    patch: fn(&Path) -> Option<(u64, usize)>,
    /// Lower-case words the failing write's message must contain.
    expect: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "l2_entry_into_l1_table",
            extended_l2: false,
            patch: |p| {
                let l1 = l1_offset(p);
                patch_be64(p, l2_offset(p), COPIED | l1);
                Some((l1, 16))
            },
            expect: &["l2 entry", "host offset 0x30000", "active l1 table"],
        },
        Case {
            name: "l2_entry_into_refcount_table",
            extended_l2: false,
            patch: |p| {
                let rt = rt_offset(p);
                patch_be64(p, l2_offset(p), COPIED | rt);
                Some((rt, 65536))
            },
            expect: &["l2 entry", "host offset 0x10000", "refcount table"],
        },
        Case {
            name: "l2_entry_into_refcount_block",
            extended_l2: false,
            patch: |p| {
                let rb = refblock_offset(p);
                patch_be64(p, l2_offset(p), COPIED | rb);
                Some((rb, 65536))
            },
            expect: &["l2 entry", "host offset 0x20000", "refcount block"],
        },
        Case {
            name: "l2_entry_into_other_l2_table",
            extended_l2: false,
            patch: |p| {
                let other = second_l2(p);
                patch_be64(p, l2_offset(p), COPIED | other);
                Some((other, 65536))
            },
            expect: &["l2 entry", "active l2 table"],
        },
        // A standard entry cannot point at cluster 0 (offset 0 means
        // "unallocated"); a compressed descriptor can. Writing over it would
        // read it as copy-on-write source and then drop a reference to cluster
        // 0, which the allocator would then hand out: QEMU's "Preventing
        // invalid allocation" case.
        Case {
            name: "compressed_entry_into_header",
            extended_l2: false,
            patch: |p| {
                patch_be64(p, l2_offset(p), compressed(0x200, 2));
                Some((0, 65536))
            },
            expect: &["l2 entry", "compressed", "qcow2 header"],
        },
        Case {
            name: "l2_entry_past_eof",
            extended_l2: false,
            patch: |p| {
                patch_be64(p, l2_offset(p), COPIED | PAST_EOF);
                None
            },
            expect: &["l2 entry", "host offset 0x10000000", "past the end of the file"],
        },
        // A preallocated zero cluster is written in place.
        Case {
            name: "zero_alloc_entry_into_l1_table",
            extended_l2: false,
            patch: |p| {
                let l1 = l1_offset(p);
                patch_be64(p, l2_offset(p), COPIED | l1 | ZERO);
                Some((l1, 16))
            },
            expect: &["l2 entry", "active l1 table"],
        },
        Case {
            name: "compressed_entry_into_refcount_block",
            extended_l2: false,
            patch: |p| {
                let rb = refblock_offset(p);
                patch_be64(p, l2_offset(p), compressed(rb + 0x400, 4));
                Some((rb, 65536))
            },
            expect: &["l2 entry", "compressed", "refcount block"],
        },
        Case {
            name: "extended_l2_entry_into_l1_table",
            extended_l2: true,
            patch: |p| {
                let l1 = l1_offset(p);
                let o = l2_offset(p);
                assert_eq!(read_be64(p, o + 8), 0xffff_ffff, "base bitmap: whole cluster allocated");
                patch_be64(p, o, COPIED | l1);
                Some((l1, 16))
            },
            expect: &["l2 entry", "host offset 0x30000", "active l1 table"],
        },
        Case {
            name: "extended_l2_entry_into_refcount_table",
            extended_l2: true,
            patch: |p| {
                let rt = rt_offset(p);
                patch_be64(p, l2_offset(p), COPIED | rt);
                Some((rt, 65536))
            },
            expect: &["l2 entry", "refcount table"],
        },
        Case {
            name: "l1_entry_into_refcount_table",
            extended_l2: false,
            patch: |p| {
                let rt = rt_offset(p);
                patch_be64(p, l1_offset(p), COPIED | rt);
                Some((rt, 65536))
            },
            expect: &["l1 entry", "l2 table at 0x10000", "refcount table"],
        },
        Case {
            name: "l1_entry_into_refcount_block",
            extended_l2: false,
            patch: |p| {
                let rb = refblock_offset(p);
                patch_be64(p, l1_offset(p), COPIED | rb);
                Some((rb, 65536))
            },
            expect: &["l1 entry", "refcount block"],
        },
        Case {
            name: "l1_entry_past_eof",
            extended_l2: false,
            patch: |p| {
                patch_be64(p, l1_offset(p), COPIED | PAST_EOF);
                None
            },
            expect: &["l1 entry", "0x10000000", "past the end of the file"],
        },
    ]
}

fn run_case(c: &Case, base: &Path, dir: &Path) -> Vec<String> {
    let mut errs = Vec::new();
    let img = dir.join(format!("{}.qcow2", c.name));
    std::fs::copy(base, &img).unwrap();
    let target = (c.patch)(&img);
    let path = s(&img);
    let before = std::fs::read(&img).unwrap();
    let target_before = target.map(|(o, n)| read_bytes(&img, o, n));
    let incompat_before = read_be64(&img, H_INCOMPAT);
    assert_eq!(incompat_before & CORRUPT_BIT, 0, "[{}] base image already corrupt", c.name);

    // The write is refused, naming the entry, the guest offset and what is there.
    let w = quring(["io", "-c", "write -P 0xcd 0 4k", &path]);
    let msg = lower(&w);
    if w.success() || w.code == Some(101) || msg.contains("panicked") {
        errs.push(format!("[{}] the write must fail cleanly:\n{}", c.name, w.describe()));
    }
    for word in c.expect.iter().chain(&["guest offset 0x0", "write failed", "marked corrupt"]) {
        if !msg.contains(word) {
            errs.push(format!("[{}] the write's message does not name `{word}`:\n{}", c.name, w.describe()));
        }
    }
    if !w.stderr.contains("qcow2: Marking image as corrupt: ") {
        errs.push(format!("[{}] no corruption event on stderr:\n{}", c.name, w.describe()));
    }

    // Nothing but the corrupt bit changed: no guest data reached the metadata.
    let after = std::fs::read(&img).unwrap();
    if after.len() != before.len() {
        errs.push(format!("[{}] file length {} -> {}", c.name, before.len(), after.len()));
    }
    if let (Some((o, n)), Some(tb)) = (target, &target_before) {
        let ta = read_bytes(&img, o, n);
        let (tb, ta) = if o == 0 {
            // The header's incompatible field is expected to change.
            let mut tb = tb.clone();
            let mut ta = ta;
            tb[72..80].fill(0);
            ta[72..80].fill(0);
            (tb, ta)
        } else {
            (tb.clone(), ta)
        };
        if tb != ta {
            errs.push(format!("[{}] the metadata at {o:#x} changed:\n{}", c.name, hexdump(&img, o, 64)));
        }
    }
    let mut b = before.clone();
    b[H_INCOMPAT as usize..H_INCOMPAT as usize + 8].fill(0);
    if b != bytes_but_incompat(&img) {
        let at = b.iter().zip(bytes_but_incompat(&img)).position(|(x, y)| *x != y);
        errs.push(format!("[{}] the image changed beyond the header's incompatible bits (first at {at:?})", c.name));
    }
    let incompat_after = read_be64(&img, H_INCOMPAT);
    if incompat_after != incompat_before | CORRUPT_BIT {
        errs.push(format!("[{}] incompatible features {incompat_before:#x} -> {incompat_after:#x}", c.name));
    }

    // QEMU sees the mark and the corruption.
    if !qemu_corrupt_flag(&img) {
        errs.push(format!("[{}] qemu-img info does not report corrupt: true", c.name));
    }
    let qc = qemu_img(["check", &path]);
    if qc.code != Some(2) {
        errs.push(format!("[{}] qemu-img check should report corruption (exit 2):\n{}", c.name, qc.describe()));
    }
    let ours = quring(["check", &path]);
    if ours.code != qc.code {
        errs.push(format!(
            "[{}] quring check exit {:?} != qemu-img check exit {:?}:\n{}",
            c.name,
            ours.code,
            qc.code,
            ours.describe()
        ));
    }

    // A read of the mapping fails clearly instead of returning metadata.
    let r = quring(["io", "-c", "read 0 4k", &path]);
    let rmsg = lower(&r);
    if r.success() || !rmsg.contains("read failed") || !c.expect.iter().all(|w| rmsg.contains(w)) {
        errs.push(format!("[{}] the read must fail naming {:?}:\n{}", c.name, c.expect, r.describe()));
    }

    // Read-only from now on: writes are refused at open, reads elsewhere work.
    let w2 = quring(["io", "-c", "write -P 0xcd 512M 4k", &path]);
    if w2.success() || !lower(&w2).contains("marked corrupt") || !lower(&w2).contains("read-only") {
        errs.push(format!("[{}] a marked image must refuse a read-write open:\n{}", c.name, w2.describe()));
    }
    let r2 = quring(["io", "-c", "read -P 0xab 512M 64k", &path]);
    if !r2.success() || r2.stdout.contains("verification failed") {
        errs.push(format!("[{}] reads elsewhere must work read-only:\n{}", c.name, r2.describe()));
    }
    if std::fs::read(&img).unwrap() != after {
        errs.push(format!("[{}] the image changed after it was marked", c.name));
    }
    errs
}

#[test]
fn bad_entries_are_refused_before_any_write() {
    let dir = tempdir();
    let standard = base(false);
    let extended = base(true);
    let errs: Vec<String> = cases()
        .iter()
        .flat_map(|c| run_case(c, if c.extended_l2 { &extended.path } else { &standard.path }, dir.path()))
        .collect();
    assert!(errs.is_empty(), "{} problem(s):\n\n{}", errs.len(), errs.join("\n\n"));
}

/// A refcount table entry on other metadata would be written over at the
/// first allocation: a read-write open marks the image and refuses; a
/// read-only open works.
#[test]
fn refcount_table_entry_into_l1_is_refused_at_open() {
    let b = base(false);
    let dir = tempdir();
    let img = dir.path().join("rt.qcow2");
    std::fs::copy(&b.path, &img).unwrap();
    let l1 = l1_offset(&img);
    patch_be64(&img, rt_offset(&img), l1);
    let before = bytes_but_incompat(&img);
    let l1_before = read_bytes(&img, l1, 16);
    let w = quring(["io", "-c", "write -P 0xcd 0 4k", &s(&img)]);
    assert!(!w.success(), "{}", w.describe());
    let msg = lower(&w);
    for word in ["refcount table entry", "entry 0", "refcount block at 0x30000", "active l1 table", "marked corrupt"] {
        assert!(msg.contains(word), "message does not name `{word}`:\n{}", w.describe());
    }
    assert_eq!(read_bytes(&img, l1, 16), l1_before);
    assert_eq!(bytes_but_incompat(&img), before, "only the incompatible bits may change");
    assert_eq!(read_be64(&img, H_INCOMPAT) & CORRUPT_BIT, CORRUPT_BIT);
    assert!(qemu_corrupt_flag(&img));
    let qc = qemu_img(["check", &s(&img)]);
    assert_eq!(qc.code, Some(2), "{}", qc.describe());
    let r = quring(["io", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xab 512M 64k", &s(&img)]);
    assert!(r.success() && !r.stdout.contains("verification failed"), "{}", r.describe());
}

/// Through the library: the failing write's error is a corruption error (EIO),
/// later writes are refused, `Image::header` carries the bit, and an overlap
/// found by a read does not mark the image (QEMU does not check reads).
#[test]
fn library_api_reports_and_marks() {
    use quring::image::{Image, Options};
    use quring::queue::{Queue, QueueOptions};
    let b = base(false);
    let dir = tempdir();
    let img = dir.path().join("lib.qcow2");
    std::fs::copy(&b.path, &img).unwrap();
    let rb = refblock_offset(&img);
    patch_be64(&img, l2_offset(&img), COPIED | rb);
    let block_before = read_bytes(&img, rb, 65536);
    {
        let image = Image::open(&img, &Options::default()).unwrap();
        let mut q = Queue::new(&image, &QueueOptions::default()).unwrap();
        let mut buf = quring::io::AlignedBuf::new(4096);
        // A read fails, names the overlap, and does not mark.
        let e = q.read_at(&mut buf, 0).unwrap_err();
        assert!(matches!(e, quring::Error::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("refcount block"), "{e}");
        assert_eq!(image.header().incompatible_features & CORRUPT_BIT, 0);
        q.read_at(&mut buf, 512 << 20).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
        // The write fails with EIO and marks.
        buf.fill(0xcd);
        let e = q.write_at(&buf, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
        let m = e.to_string();
        assert!(m.contains("guest offset 0x0") && m.contains("refcount block") && m.contains("marked corrupt"), "{m}");
        assert_eq!(image.header().incompatible_features & CORRUPT_BIT, CORRUPT_BIT);
        // Even writes elsewhere are refused now.
        let e = q.write_at(&buf, 512 << 20).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        drop(q);
        image.close().unwrap();
    }
    assert_eq!(read_bytes(&img, rb, 65536), block_before);
    assert_eq!(read_be64(&img, H_INCOMPAT) & CORRUPT_BIT, CORRUPT_BIT);
    let e = Image::open(&img, &Options::default()).unwrap_err();
    assert!(e.to_string().contains("marked corrupt"), "{e}");
    Image::open(&img, &Options { read_only: true, ..Default::default() }).unwrap();
}

/// A misaligned data offset is an event QEMU signals on reads too (its
/// `qcow2_get_host_offset`): a read through an image open for writing marks it,
/// one open read-only does not.
#[test]
fn misaligned_entry_read_marks_a_writable_image() {
    use quring::image::{Image, Options};
    use quring::queue::{Queue, QueueOptions};
    let b = base(false);
    let dir = tempdir();
    let img = dir.path().join("misaligned.qcow2");
    std::fs::copy(&b.path, &img).unwrap();
    patch_be64(&img, l2_offset(&img), COPIED | 0x50200);
    let mut buf = quring::io::AlignedBuf::new(4096);
    {
        let ro = Image::open(&img, &Options { read_only: true, ..Default::default() }).unwrap();
        let mut q = Queue::new(&ro, &QueueOptions::default()).unwrap();
        let e = q.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("unaligned"), "{e}");
    }
    assert_eq!(read_be64(&img, H_INCOMPAT) & CORRUPT_BIT, 0, "a read-only open must not mark");
    {
        let rw = Image::open(&img, &Options::default()).unwrap();
        let mut q = Queue::new(&rw, &QueueOptions::default()).unwrap();
        let e = q.read_at(&mut buf, 0).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("unaligned") && m.contains("marked corrupt"), "{m}");
        // Reads elsewhere still work; writes do not.
        q.read_at(&mut buf, 512 << 20).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
        assert!(q.write_at(&buf, 512 << 20).is_err());
    }
    assert_eq!(read_be64(&img, H_INCOMPAT) & CORRUPT_BIT, CORRUPT_BIT);
    assert!(qemu_corrupt_flag(&img));
}

/// A read-only image shared with a writer (`-U`) may see entries that point
/// past the end of the file as it was at open: the length is taken again
/// before such an entry is called corrupt.
#[test]
fn read_only_image_sees_the_file_grow() {
    use quring::image::{Image, Options};
    use quring::queue::{Queue, QueueOptions};
    use std::io::Write;
    let b = base(false);
    let dir = tempdir();
    let img = dir.path().join("grow.qcow2");
    std::fs::copy(&b.path, &img).unwrap();
    let ro = Image::open(&img, &Options { read_only: true, force_share: true, ..Default::default() }).unwrap();
    let mut q = Queue::new(&ro, &QueueOptions::default()).unwrap();
    let mut buf = quring::io::AlignedBuf::new(4096);
    q.read_at(&mut buf, 0).unwrap();
    // Another writer appends a cluster and maps guest 512 MiB (whose L2 table
    // was not read yet) to it.
    let end = file_len(&img);
    let mut f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
    f.write_all(&[0xee; 65536]).unwrap();
    f.sync_all().unwrap();
    patch_be64(&img, second_l2(&img), COPIED | end);
    q.read_at(&mut buf, 512 << 20).unwrap();
    assert!(buf.iter().all(|&x| x == 0xee));
}

/// The checks cost no false alarms on a clean image that quring fills, grows
/// (new L2 tables and refcount blocks are recorded as metadata) and reopens.
#[test]
fn clean_images_stay_clean() {
    let dir = tempdir();
    let img = dir.path().join("clean.qcow2");
    // 4 KiB clusters: an L2 table per 2 MiB of guest and a refcount block per
    // 8 MiB of host, so these writes allocate 24 L2 tables and a second refcount
    // block while data keeps being allocated around them; the smallest L2 cache
    // makes slices be evicted and checked again on reload.
    create_qcow2(&img, &Qcow2Opts::cluster(4096), 64 << 20);
    let p = s(&img);
    let mut args = vec!["io".to_string(), "--l2-cache-size".into(), "32k".into()];
    for i in 0..24u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {}M 392k", i + 1, i * 2 + 1));
    }
    for i in 0..24u64 {
        args.push("-c".into());
        args.push(format!("read -P {} {}M 392k", i + 1, i * 2 + 1));
    }
    args.push(p.clone());
    let r = quring(&args).ok();
    assert!(!r.stdout.contains("verification failed"), "{}", r.describe());
    assert!(file_len(&img) > 9 << 20, "the writes should need a second refcount block");
    // Compressed clusters next to metadata, from qemu-img.
    let comp = dir.path().join("comp.qcow2");
    qemu_img(["convert", "-q", "-c", "-O", "qcow2", &p, &s(&comp)]).ok();
    for f in [&p, &s(&comp)] {
        let mut args = vec!["io".to_string()];
        for i in 0..24u64 {
            args.push("-c".into());
            args.push(format!("read -P {} {}M 392k", i + 1, i * 2 + 1));
        }
        args.push(f.clone());
        let r = quring(&args).ok();
        assert!(!r.stdout.contains("verification failed"), "{}", r.describe());
        qemu_img(["check", f]).ok();
        assert!(!qemu_corrupt_flag(Path::new(f)));
    }
    // Overwrite the compressed image's clusters (copy-on-write out of
    // compressed clusters) and check again.
    let r = quring(["io", "-c", "write -P 0x77 1M 512k", "-c", "read -P 0x77 1M 512k", &s(&comp)]).ok();
    assert!(!r.stdout.contains("verification failed"), "{}", r.describe());
    qemu_img(["check", &s(&comp)]).ok();
    assert!(!qemu_corrupt_flag(&comp));
}
