//! A corpus of malformed qcow2 images, generated from small valid images made
//! by qemu-img/qemu-io and patched in place. Used by `tests/bad_images.rs`
//! and, via [`write_corpus`], as a fuzzer seed corpus.

use super::*;

/// What a command run on a bad image must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Must {
    /// Exit non-zero with a message on stderr containing one of the case's
    /// expected substrings.
    Fail,
    /// Either outcome is acceptable (still: no panic, bounded memory, and a
    /// message on stderr if it fails).
    Either,
    /// For `check` only: the exit code must equal `qemu-img check`'s (which
    /// must itself be 2 or 3: QEMU can open the image and finds problems).
    SameAsQemu,
}

/// One malformed image.
#[derive(Debug, Clone)]
pub struct BadCase {
    pub name: &'static str,
    pub path: PathBuf,
    /// Lower-case substrings; stderr of a failing command must contain at
    /// least one of them (compared case-insensitively).
    pub expect: &'static [&'static str],
    pub info: Must,
    pub convert: Must,
    pub check: Must,
    /// What was done to the image.
    pub what: &'static str,
}

// Header field offsets.
pub const H_MAGIC: u64 = 0;
pub const H_VERSION: u64 = 4;
pub const H_BACKING_OFFSET: u64 = 8;
pub const H_BACKING_SIZE: u64 = 16;
pub const H_CLUSTER_BITS: u64 = 20;
pub const H_SIZE: u64 = 24;
pub const H_CRYPT: u64 = 32;
pub const H_L1_SIZE: u64 = 36;
pub const H_L1_OFFSET: u64 = 40;
pub const H_RT_OFFSET: u64 = 48;
pub const H_RT_CLUSTERS: u64 = 56;
pub const H_NB_SNAPSHOTS: u64 = 60;
pub const H_SNAPSHOTS_OFFSET: u64 = 64;
pub const H_INCOMPAT: u64 = 72;
pub const H_COMPAT: u64 = 80;
pub const H_AUTOCLEAR: u64 = 88;
pub const H_REFCOUNT_ORDER: u64 = 96;
pub const H_HEADER_LENGTH: u64 = 100;
pub const H_COMPRESSION_TYPE: u64 = 104;

/// Feature name table extension magic.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

const CLUSTER: &[&str] = &["cluster_bits", "cluster bits", "cluster size", "cluster_size"];
const L1: &[&str] = &["l1"];
const REFCOUNT: &[&str] = &["refcount", "reference count"];
const HEADER_LENGTH: &[&str] = &["header_length", "header length", "header size", "header too short", "header exceeds"];
const BACKING: &[&str] = &["backing"];
const COMPRESS: &[&str] = &["compress"];
const SNAPSHOT: &[&str] = &["snapshot"];
const VERSION: &[&str] = &["version"];
/// A data/table reference outside the file.
const PAST_EOF: &[&str] = &["past", "beyond", "end of file", "eof", "outside", "truncated"];

/// Offset of the L1 table, read from the header.
pub fn l1_offset(p: &Path) -> u64 {
    read_be64(p, H_L1_OFFSET)
}

/// Offset of the first L2 table (from L1[0]).
pub fn l2_offset(p: &Path) -> u64 {
    read_be64(p, l1_offset(p)) & 0x00ff_ffff_ffff_fe00
}

/// Offset of the refcount table, read from the header.
pub fn rt_offset(p: &Path) -> u64 {
    read_be64(p, H_RT_OFFSET)
}

/// Offset of the first refcount block (from the refcount table).
pub fn refblock_offset(p: &Path) -> u64 {
    read_be64(p, rt_offset(p)) & !0x1ff
}

/// Finds the header extension of type `ext` and returns (offset of its
/// type field, its length).
pub fn find_extension(p: &Path, ext: u32) -> Option<(u64, u32)> {
    let hl = read_be32(p, H_HEADER_LENGTH) as u64;
    let cs = 1u64 << read_be32(p, H_CLUSTER_BITS);
    let mut off = hl;
    while off + 8 <= cs {
        let t = read_be32(p, off);
        let len = read_be32(p, off + 4);
        if t == 0 {
            return None;
        }
        if t == ext {
            return Some((off, len));
        }
        off += 8 + (len as u64).div_ceil(8) * 8;
    }
    None
}

/// Appends a header extension (`kind`, `data`) after the last one (where the end marker
/// was), followed by a new end marker.
pub fn add_extension(p: &Path, kind: u32, data: &[u8]) {
    let hl = read_be32(p, H_HEADER_LENGTH) as u64;
    let mut off = hl;
    loop {
        let t = read_be32(p, off);
        if t == 0 {
            break;
        }
        off += 8 + (read_be32(p, off + 4) as u64).div_ceil(8) * 8;
    }
    let mut rec = Vec::new();
    rec.extend_from_slice(&kind.to_be_bytes());
    rec.extend_from_slice(&(data.len() as u32).to_be_bytes());
    rec.extend_from_slice(data);
    rec.resize(8 + data.len().div_ceil(8) * 8 + 8, 0);
    patch_bytes(p, off, &rec);
}

/// quring's identity extension type (docs/identity.md).
pub const EXT_IDENTITY: u32 = 0x7172_6964;

/// A well-formed identity payload (GUID 0x11.., backing GUID 0, backing length, no name).
pub fn identity_payload(backing_len: u64) -> Vec<u8> {
    let mut d = vec![0x11u8; 16];
    d.extend_from_slice(&[0u8; 16]);
    d.extend_from_slice(&backing_len.to_be_bytes());
    d.extend_from_slice(&[0u8; 8]);
    d
}

/// Overwrites the last entry of the feature name table with
/// (`kind`, `bit`, `name`).
pub fn patch_feature_name(p: &Path, kind: u8, bit: u8, name: &str) {
    let (off, len) = find_extension(p, EXT_FEATURE_TABLE).expect("feature name table");
    let n = len as u64 / 48;
    assert!(n > 0);
    let entry = off + 8 + (n - 1) * 48;
    let mut e = [0u8; 48];
    e[0] = kind;
    e[1] = bit;
    e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    patch_bytes(p, entry, &e);
}

/// Small valid images the cases are derived from.
struct Bases {
    _dir: tempfile::TempDir,
    /// 64 KiB clusters, 1 MiB, data at guest 0 (host 0x50000) and 128 KiB
    /// (host 0x60000). L1 0x30000, L2 0x40000, refcount table 0x10000,
    /// refcount block 0x20000. File is 7 clusters.
    plain: PathBuf,
    /// `plain` converted with `qemu-img convert -c`.
    compressed: PathBuf,
    /// 64 KiB clusters with extended L2, 4 KiB written at 0.
    extl2: PathBuf,
    /// 4 KiB clusters, 1 MiB, 8 KiB written at 0.
    small_cluster: PathBuf,
    /// `plain` plus an internal snapshot `s1`.
    snap: PathBuf,
    /// `plain` plus a persistent bitmap `b0` (qemu-img bitmap --add) with 64 KiB at 0
    /// written after it (one data cluster).
    bitmap: PathBuf,
}

fn make_bases() -> Bases {
    let dir = tempdir();
    let plain = dir.path().join("plain.qcow2");
    build_qcow2(
        &plain,
        &Qcow2Opts::default(),
        1 << 20,
        &["write -P 0x5a 0 64k".into(), "write -P 0xa5 128k 64k".into()],
    );
    let compressed = dir.path().join("compressed.qcow2");
    qemu_img(["convert", "-q", "-c", "-O", "qcow2", &s(&plain), &s(&compressed)]).ok();
    let extl2 = dir.path().join("extl2.qcow2");
    build_qcow2(
        &extl2,
        &Qcow2Opts { extended_l2: true, ..Default::default() },
        1 << 20,
        &["write -P 0x5a 0 4k".into()],
    );
    let small_cluster = dir.path().join("small.qcow2");
    build_qcow2(&small_cluster, &Qcow2Opts::cluster(4096), 1 << 20, &["write -P 0x5a 0 8k".into()]);
    let snap = dir.path().join("snap.qcow2");
    std::fs::copy(&plain, &snap).unwrap();
    qemu_img(["snapshot", "-q", "-c", "s1", &s(&snap)]).ok();
    let bitmap = dir.path().join("bitmap.qcow2");
    std::fs::copy(&plain, &bitmap).unwrap();
    qemu_img(["bitmap", "--add", &s(&bitmap), "b0"]).ok();
    qemu_io_cmds(&bitmap, "qcow2", &["write -P 1 0 64k".into()]);
    Bases { _dir: dir, plain, compressed, extl2, small_cluster, snap, bitmap }
}

type Patch = fn(&Path);

struct Spec {
    name: &'static str,
    base: fn(&Bases) -> Option<&Path>,
    patch: Patch,
    expect: &'static [&'static str],
    info: Must,
    convert: Must,
    check: Must,
    what: &'static str,
}

fn plain(b: &Bases) -> Option<&Path> {
    Some(&b.plain)
}
fn compressed(b: &Bases) -> Option<&Path> {
    Some(&b.compressed)
}
fn extl2(b: &Bases) -> Option<&Path> {
    Some(&b.extl2)
}
fn small_cluster(b: &Bases) -> Option<&Path> {
    Some(&b.small_cluster)
}
fn snap(b: &Bases) -> Option<&Path> {
    Some(&b.snap)
}
fn no_base(_: &Bases) -> Option<&Path> {
    None
}

use Must::{Either, Fail, SameAsQemu};

/// One corpus case: what info, convert and check must do with the damaged image.
macro_rules! case {
    ($info:expr, $convert:expr, $check:expr; $name:expr, $base:expr, $expect:expr, $what:expr, $patch:expr) => {
        Spec {
            name: $name,
            base: $base,
            patch: $patch,
            expect: $expect,
            info: $info,
            convert: $convert,
            check: $check,
            what: $what,
        }
    };
}

/// Header-level problem: every command must refuse the image.
macro_rules! header_case {
    ($($t:tt)*) => { case!(Fail, Fail, Fail; $($t)*) };
}

/// The data file cannot be opened (missing, or no name): `qemu-img info` opens the image
/// without I/O and describes it, and so does quring's info (tests/golden_tools.rs pins its
/// output to qemu-img's); everything that needs the data refuses, naming it.
macro_rules! no_io_case {
    ($($t:tt)*) => { case!(Either, Fail, Fail; $($t)*) };
}

/// Problem in the data path that QEMU can open: info may succeed, convert
/// must fail, check must agree with qemu-img check.
macro_rules! data_case {
    ($($t:tt)*) => { case!(Either, Fail, SameAsQemu; $($t)*) };
}

/// Metadata inconsistency that does not affect reading guest data: only
/// check has to notice (and agree with qemu-img check).
macro_rules! check_case {
    ($($t:tt)*) => { case!(Either, Either, SameAsQemu; $($t)*) };
}

/// quring's identity extension malformed (QEMU ignores it): quring refuses to open the
/// image; `check` may go either way.
macro_rules! identity_case {
    ($($t:tt)*) => { case!(Fail, Fail, Either; $($t)*) };
}

const IDENTITY: &[&str] = &["identity"];

/// Persistent bitmap directory damage: QEMU refuses to open such images, so does quring
/// (naming the field); `check` may go either way.
macro_rules! bitmap_case {
    ($($t:tt)*) => { case!(Fail, Fail, Either; $($t)*) };
}

fn bitmap(b: &Bases) -> Option<&Path> {
    Some(&b.bitmap)
}

/// The bitmaps extension's payload offset.
fn bitmaps_ext(p: &Path) -> u64 {
    find_extension(p, 0x2385_2875).expect("bitmaps extension").0 + 8
}

/// The first bitmap directory entry's offset.
fn bitmap_entry(p: &Path) -> u64 {
    read_be64(p, bitmaps_ext(p) + 16)
}

fn bitmap_specs() -> Vec<Spec> {
    vec![
        bitmap_case!(
            "bitmap_dir_offset_unaligned",
            bitmap,
            &["bitmap_directory_offset"],
            "bitmap directory offset not cluster aligned",
            |p| {
                let e = bitmaps_ext(p);
                patch_be64(p, e + 16, read_be64(p, e + 16) + 512);
            }
        ),
        bitmap_case!(
            "bitmap_dir_offset_past_eof",
            bitmap,
            &["bitmap_directory_offset"],
            "bitmap directory past the end of the file",
            |p| {
                patch_be64(p, bitmaps_ext(p) + 16, 0x1000_0000);
            }
        ),
        bitmap_case!(
            "bitmap_dir_size_huge",
            bitmap,
            &["bitmap_directory_size"],
            "bitmap directory size above QEMU's 64 MiB limit",
            |p| {
                patch_be64(p, bitmaps_ext(p) + 8, 1 << 40);
            }
        ),
        bitmap_case!("bitmap_nb_zero", bitmap, &["nb_bitmaps"], "bitmaps extension with zero bitmaps", |p| {
            patch_be32(p, bitmaps_ext(p), 0);
        }),
        bitmap_case!(
            "bitmap_name_too_long",
            bitmap,
            &["name_size", "bitmap directory", "extra_data_size"],
            "bitmap name length 1024",
            |p| {
                patch_be16(p, bitmap_entry(p) + 18, 1024);
            }
        ),
        bitmap_case!("bitmap_flags_reserved", bitmap, &["bitmap flags"], "bitmap flags with reserved bit 8", |p| {
            let e = bitmap_entry(p);
            patch_be32(p, e + 12, read_be32(p, e + 12) | 0x100);
        }),
        bitmap_case!("bitmap_granularity_small", bitmap, &["granularity_bits"], "bitmap granularity_bits 8", |p| {
            patch_u8(p, bitmap_entry(p) + 17, 8);
        }),
        bitmap_case!("bitmap_granularity_huge", bitmap, &["granularity_bits"], "bitmap granularity_bits 40", |p| {
            patch_u8(p, bitmap_entry(p) + 17, 40);
        }),
        bitmap_case!("bitmap_type_2", bitmap, &["bitmap type"], "bitmap type 2", |p| {
            patch_u8(p, bitmap_entry(p) + 16, 2);
        }),
        bitmap_case!(
            "bitmap_table_unaligned",
            bitmap,
            &["bitmap_table_offset"],
            "bitmap table offset not cluster aligned",
            |p| {
                let e = bitmap_entry(p);
                patch_be64(p, e, read_be64(p, e) + 512);
            }
        ),
        bitmap_case!("bitmap_table_size_zero", bitmap, &["bitmap_table_size"], "bitmap table size 0", |p| {
            patch_be32(p, bitmap_entry(p) + 8, 0);
        }),
        bitmap_case!(
            "bitmap_table_entry_reserved",
            bitmap,
            &["bitmap table entry"],
            "bitmap table entry with reserved bit 1",
            |p| {
                let t = read_be64(p, bitmap_entry(p));
                patch_be64(p, t, read_be64(p, t) | 2);
            }
        ),
        bitmap_case!(
            "bitmap_table_entry_past_eof",
            bitmap,
            &["bitmap table entry"],
            "bitmap data cluster past the end of the file",
            |p| {
                patch_be64(p, read_be64(p, bitmap_entry(p)), 0x1000_0000);
            }
        ),
        bitmap_case!(
            "bitmap_dir_offset_zero",
            bitmap,
            &["bitmap_directory_offset"],
            "bitmap directory offset 0",
            |p| {
                patch_be64(p, bitmaps_ext(p) + 16, 0);
            }
        ),
        bitmap_case!(
            "bitmap_nb_above_dir",
            bitmap,
            &["bitmap directory", "bitmap_directory_size"],
            "nb_bitmaps 2 with a directory that holds one entry",
            |p| {
                patch_be32(p, bitmaps_ext(p), 2);
            }
        ),
        bitmap_case!("bitmap_nb_huge", bitmap, &["nb_bitmaps"], "nb_bitmaps 65536, above QEMU's limit", |p| {
            patch_be32(p, bitmaps_ext(p), 65536);
        }),
        bitmap_case!(
            "bitmap_dir_size_below_entries",
            bitmap,
            &["bitmap_directory_size"],
            "bitmap directory size 16, below one entry's fixed 24 bytes",
            |p| {
                patch_be64(p, bitmaps_ext(p) + 8, 16);
            }
        ),
        bitmap_case!(
            "bitmap_dir_size_above_entries",
            bitmap,
            &["bitmap_directory_size"],
            "bitmap directory size 8 bytes more than its one entry takes (the file grown by a cluster)",
            |p| {
                let e = bitmaps_ext(p);
                patch_be64(p, e + 8, read_be64(p, e + 8) + 8);
                let len = std::fs::metadata(p).unwrap().len();
                OpenOptions::new().write(true).open(p).unwrap().set_len(len + 65536).unwrap();
            }
        ),
        bitmap_case!(
            "bitmap_ext_length_16",
            bitmap,
            &["bitmaps extension", "extension"],
            "bitmaps extension length 16 instead of 24",
            |p| {
                patch_be32(p, bitmaps_ext(p) - 4, 16);
            }
        ),
        bitmap_case!("bitmap_ext_reserved", bitmap, &["reserved"], "bitmaps extension reserved field 1", |p| {
            patch_be32(p, bitmaps_ext(p) + 4, 1);
        }),
        bitmap_case!(
            "bitmap_extra_data_huge",
            bitmap,
            &["extra_data_size"],
            "bitmap extra_data_size 0xffffffff",
            |p| {
                patch_be32(p, bitmap_entry(p) + 20, u32::MAX);
            }
        ),
        bitmap_case!("bitmap_name_empty", bitmap, &["name_size"], "bitmap name_size 0", |p| {
            patch_be16(p, bitmap_entry(p) + 18, 0);
        }),
        bitmap_case!("bitmap_table_size_huge", bitmap, &["bitmap_table_size"], "bitmap table size 2^27 + 1", |p| {
            patch_be32(p, bitmap_entry(p) + 8, 0x0800_0001);
        }),
        bitmap_case!(
            "bitmap_table_size_too_long",
            bitmap,
            &["bitmap_table_size"],
            "bitmap table of 2 entries where the disk needs 1 (QEMU cannot load it)",
            |p| {
                patch_be32(p, bitmap_entry(p) + 8, 2);
            }
        ),
        bitmap_case!(
            "bitmap_table_past_eof",
            bitmap,
            &["bitmap_table_offset"],
            "bitmap table offset past the end of the file",
            |p| {
                patch_be64(p, bitmap_entry(p), 0x1000_0000);
            }
        ),
        bitmap_case!(
            "bitmap_table_is_directory",
            bitmap,
            &["bitmap_table_offset", "overlap"],
            "bitmap table at the directory's cluster",
            |p| {
                let e = bitmap_entry(p);
                patch_be64(p, e, e);
            }
        ),
        bitmap_case!(
            "bitmap_table_entry_ones_and_offset",
            bitmap,
            &["bitmap table entry"],
            "bitmap table entry with a data offset and the all-ones bit",
            |p| {
                let t = read_be64(p, bitmap_entry(p));
                patch_be64(p, t, read_be64(p, t) | 1);
            }
        ),
        bitmap_case!(
            "bitmap_table_entry_unaligned",
            bitmap,
            &["bitmap table entry"],
            "bitmap table entry offset not cluster aligned",
            |p| {
                let t = read_be64(p, bitmap_entry(p));
                patch_be64(p, t, read_be64(p, t) + 512);
            }
        ),
    ]
}

fn specs() -> Vec<Spec> {
    vec![
        identity_case!(
            "identity_truncated_guid",
            plain,
            IDENTITY,
            "identity extension of 12 bytes (a truncated GUID)",
            |p| { add_extension(p, EXT_IDENTITY, &[0x11; 12]) }
        ),
        identity_case!(
            "identity_without_name_hash",
            plain,
            IDENTITY,
            "identity extension of 40 bytes (the backing name hash missing)",
            |p| add_extension(p, EXT_IDENTITY, &identity_payload(0)[..40])
        ),
        identity_case!("identity_nil_guid", plain, IDENTITY, "identity extension with an all-zero image GUID", |p| {
            add_extension(p, EXT_IDENTITY, &[0u8; 48])
        }),
        identity_case!(
            "identity_huge_backing_length",
            plain,
            IDENTITY,
            "identity extension with backing length 2^64-1",
            |p| add_extension(p, EXT_IDENTITY, &identity_payload(u64::MAX))
        ),
        identity_case!("identity_twice", plain, IDENTITY, "two identity extensions", |p| {
            add_extension(p, EXT_IDENTITY, &identity_payload(0));
            add_extension(p, EXT_IDENTITY, &identity_payload(0));
        }),
        identity_case!(
            "identity_overruns_cluster",
            plain,
            &["overrun", "extension"],
            "identity extension whose length runs past the header cluster",
            |p| {
                add_extension(p, EXT_IDENTITY, &identity_payload(0));
                let (off, _) = find_extension(p, EXT_IDENTITY).unwrap();
                patch_be32(p, off + 4, 0x20000);
            }
        ),
        header_case!(
            "empty_file",
            no_base,
            &["empty", "header", "magic", "truncated", "too small", "short", "not in qcow2 format"],
            "zero-length file",
            |p| std::fs::write(p, b"").unwrap()
        ),
        header_case!(
            "truncated_header_50",
            plain,
            &["header", "truncated", "short", "too small", "eof", "end of file"],
            "file cut to 50 bytes, inside the header",
            |p| truncate_file(p, 50)
        ),
        header_case!("bad_magic", plain, &["magic", "not a qcow2", "not in qcow2 format"], "magic QFJ\\xfb", |p| {
            patch_bytes(p, H_MAGIC, b"QFJ\xfb")
        }),
        header_case!("version_1", plain, VERSION, "version 1", |p| patch_be32(p, H_VERSION, 1)),
        header_case!("version_4", plain, VERSION, "version 4", |p| patch_be32(p, H_VERSION, 4)),
        header_case!(
            "cluster_bits_8",
            plain,
            CLUSTER,
            "cluster_bits 8 (256-byte clusters, below the minimum 9)",
            |p| patch_be32(p, H_CLUSTER_BITS, 8)
        ),
        header_case!("cluster_bits_31", plain, CLUSTER, "cluster_bits 31", |p| { patch_be32(p, H_CLUSTER_BITS, 31) }),
        header_case!("cluster_bits_22", plain, CLUSTER, "cluster_bits 22 (4 MiB, above QEMU's 2 MiB cap)", |p| {
            patch_be32(p, H_CLUSTER_BITS, 22)
        }),
        header_case!("l1_size_2p31", plain, L1, "l1_size 2^31 entries", |p| { patch_be32(p, H_L1_SIZE, 0x8000_0000) }),
        header_case!("l1_size_too_small", plain, L1, "l1_size 0 for a 1 MiB disk (needs 1)", |p| patch_be32(
            p, H_L1_SIZE, 0
        )),
        header_case!("l1_offset_misaligned", plain, L1, "l1_table_offset 0x30200 (not cluster aligned)", |p| {
            patch_be64(p, H_L1_OFFSET, 0x30200)
        }),
        header_case!("l1_offset_past_eof", plain, L1, "l1_table_offset 256 MiB, file is 448 KiB", |p| patch_be64(
            p,
            H_L1_OFFSET,
            0x1000_0000
        )),
        header_case!("refcount_table_offset_misaligned", plain, REFCOUNT, "refcount_table_offset 0x10200", |p| {
            patch_be64(p, H_RT_OFFSET, 0x10200)
        }),
        header_case!(
            "refcount_table_offset_past_eof",
            plain,
            REFCOUNT,
            "refcount_table_offset 256 MiB, file is 448 KiB",
            |p| patch_be64(p, H_RT_OFFSET, 0x1000_0000)
        ),
        header_case!(
            "refcount_table_clusters_huge",
            plain,
            REFCOUNT,
            "refcount_table_clusters 2^31-1",
            |p| patch_be32(p, H_RT_CLUSTERS, 0x7fff_ffff)
        ),
        header_case!("refcount_order_7", plain, REFCOUNT, "refcount_order 7 (128-bit refcounts)", |p| patch_be32(
            p,
            H_REFCOUNT_ORDER,
            7
        )),
        header_case!("header_length_96", plain, HEADER_LENGTH, "v3 header_length 96 (< 104)", |p| patch_be32(
            p,
            H_HEADER_LENGTH,
            96
        )),
        header_case!("header_length_108", plain, HEADER_LENGTH, "header_length 108 (not a multiple of 8)", |p| {
            patch_be32(p, H_HEADER_LENGTH, 108)
        }),
        header_case!("header_length_gt_cluster", plain, HEADER_LENGTH, "header_length 0x10008 (> cluster size)", |p| {
            patch_be32(p, H_HEADER_LENGTH, 0x10008)
        }),
        header_case!(
            "extension_overruns_cluster0",
            plain,
            &["extension"],
            "feature name table extension length 0x10000 (runs past cluster 0)",
            |p| {
                let (off, _) = find_extension(p, EXT_FEATURE_TABLE).unwrap();
                patch_be32(p, off + 4, 0x10000);
            }
        ),
        header_case!(
            "backing_name_1024",
            plain,
            BACKING,
            "backing file name of 1024 bytes at 0x1000 (limit 1023)",
            |p| {
                patch_bytes(p, 0x1000, &[b'a'; 1024]);
                patch_be64(p, H_BACKING_OFFSET, 0x1000);
                patch_be32(p, H_BACKING_SIZE, 1024);
            }
        ),
        header_case!(
            "backing_offset_past_cluster0",
            plain,
            BACKING,
            "backing_file_offset 0x10000 (outside cluster 0), size 8",
            |p| {
                patch_be64(p, H_BACKING_OFFSET, 0x10000);
                patch_be32(p, H_BACKING_SIZE, 8);
            }
        ),
        data_case!(
            "l2_table_past_eof",
            plain,
            &["l2", "past", "beyond", "end of file", "eof", "outside"],
            "L1[0] points to an L2 table at 256 MiB, file is 448 KiB",
            |p| patch_be64(p, l1_offset(p), 0x8000_0000_1000_0000)
        ),
        data_case!("l1_entry_reserved_bits", plain, &["l1", "reserved"], "L1[0] has reserved bit 60 set", |p| {
            let o = l1_offset(p);
            let v = read_be64(p, o);
            patch_be64(p, o, v | 1 << 60);
        }),
        data_case!("l2_entry_past_eof", plain, PAST_EOF, "L2[0] points to a data cluster at 256 MiB", |p| patch_be64(
            p,
            l2_offset(p),
            0x8000_0000_1000_0000
        )),
        data_case!(
            "l2_entry_misaligned",
            plain,
            &["align", "l2"],
            "L2[0] data offset 0x50200 (not cluster aligned)",
            |p| patch_be64(p, l2_offset(p), 0x8000_0000_0005_0200)
        ),
        data_case!("l2_entry_reserved_bits", plain, &["l2", "reserved"], "L2[0] has reserved bit 56 set", |p| {
            let o = l2_offset(p);
            let v = read_be64(p, o);
            patch_be64(p, o, v | 1 << 56);
        }),
        data_case!(
            "compressed_with_copied",
            compressed,
            &["compress", "copied"],
            "compressed L2[0] with the COPIED bit (63) set",
            |p| {
                let o = l2_offset(p);
                let v = read_be64(p, o);
                assert!(v & (1 << 62) != 0, "base L2[0] is not compressed: {v:#x}");
                patch_be64(p, o, v | 1 << 63);
            }
        ),
        data_case!(
            "compressed_past_eof",
            compressed,
            &["compress", "past", "beyond", "end of file", "eof", "outside"],
            "compressed L2[0] host offset 256 MiB",
            |p| {
                let o = l2_offset(p);
                let v = read_be64(p, o);
                assert!(v & (1 << 62) != 0, "base L2[0] is not compressed: {v:#x}");
                // 64 KiB clusters: offset in bits 0..53.
                let mask = (1u64 << 54) - 1;
                patch_be64(p, o, (v & !mask) | 0x1000_0000);
            }
        ),
        // qemu-img check does not decompress data (exit 0), so only
        // reading has to fail.
        Spec {
            name: "compressed_garbage",
            base: compressed,
            patch: |p| {
                let o = l2_offset(p);
                let v = read_be64(p, o);
                assert!(v & (1 << 62) != 0, "base L2[0] is not compressed: {v:#x}");
                let host = v & ((1u64 << 54) - 1);
                patch_bytes(p, host, &[0xff; 64]);
            },
            expect: &["compress", "inflate", "deflate"],
            info: Either,
            convert: Fail,
            check: Either,
            what: "compressed cluster's deflate stream overwritten with 0xff",
        },
        header_case!(
            "unknown_incompat_named",
            plain,
            &["frobnication"],
            "incompatible bit 5 set, named \"frobnication\" in the feature name table",
            |p| {
                patch_be64(p, H_INCOMPAT, 1 << 5);
                patch_feature_name(p, 0, 5, "frobnication");
            }
        ),
        header_case!(
            "unknown_incompat_unnamed",
            plain,
            &["incompatible", "feature"],
            "incompatible bit 6 set, not in the feature name table",
            |p| patch_be64(p, H_INCOMPAT, 1 << 6)
        ),
        header_case!(
            "zstd_without_incompat_bit",
            plain,
            COMPRESS,
            "compression_type 1 (zstd) but incompatible bit 3 clear",
            |p| patch_u8(p, H_COMPRESSION_TYPE, 1)
        ),
        header_case!("compression_type_2", plain, COMPRESS, "compression_type 2 with incompatible bit 3 set", |p| {
            patch_u8(p, H_COMPRESSION_TYPE, 2);
            patch_be64(p, H_INCOMPAT, 1 << 3);
        }),
        header_case!("crypt_method_aes", plain, &["crypt"], "crypt_method 1 (AES)", |p| patch_be32(p, H_CRYPT, 1)),
        no_io_case!(
            "external_data_file_bit",
            plain,
            &["external", "data file", "data-file", "data_file"],
            "incompatible bit 2 (external data file) without a data file name",
            |p| patch_be64(p, H_INCOMPAT, 1 << 2)
        ),
        header_case!(
            "extended_l2_cluster_bits_12",
            small_cluster,
            &["extended", "subcluster"],
            "incompatible bit 4 (extended L2) with 4 KiB clusters",
            |p| patch_be64(p, H_INCOMPAT, 1 << 4)
        ),
        header_case!("nb_snapshots_huge", plain, SNAPSHOT, "nb_snapshots 2^32-1, snapshots_offset 256 MiB", |p| {
            patch_be32(p, H_NB_SNAPSHOTS, 0xffff_ffff);
            patch_be64(p, H_SNAPSHOTS_OFFSET, 0x1000_0000);
        }),
        header_case!("snapshots_offset_misaligned", snap, SNAPSHOT, "snapshots_offset moved by 0x200", |p| {
            let o = read_be64(p, H_SNAPSHOTS_OFFSET);
            patch_be64(p, H_SNAPSHOTS_OFFSET, o + 0x200);
        }),
        // QEMU validates the snapshot table offset even when there are no snapshots
        // (iotest 080); found by the differential scenarios.
        header_case!(
            "snapshots_offset_misaligned_no_snapshots",
            plain,
            SNAPSHOT,
            "nb_snapshots 0, snapshots_offset 0x1234567890abcdef",
            |p| {
                patch_be32(p, H_NB_SNAPSHOTS, 0);
                patch_be64(p, H_SNAPSHOTS_OFFSET, 0x1234_5678_90ab_cdef);
            }
        ),
        check_case!("snapshot_l1_size_huge", snap, SNAPSHOT, "snapshot 1 has l1_size 2^31-1", |p| {
            let o = read_be64(p, H_SNAPSHOTS_OFFSET);
            patch_be32(p, o + 8, 0x7fff_ffff);
        }),
        // qemu-img check gives up on this one (exit 1, "Check failed"), so
        // quring's check may report either 1 or 2.
        Spec {
            name: "refcount_table_entry_misaligned",
            base: plain,
            patch: |p| {
                let o = rt_offset(p);
                patch_be64(p, o, 0x20200);
            },
            expect: REFCOUNT,
            info: Either,
            convert: Either,
            check: Fail,
            what: "refcount table[0] = 0x20200 (not cluster aligned)",
        },
        data_case!(
            "extl2_alloc_and_zero",
            extl2,
            &["l2", "subcluster", "bitmap"],
            "extended L2[0]: subcluster 0 both allocated and zero",
            |p| {
                let o = l2_offset(p);
                let bm = read_be64(p, o + 8);
                assert_eq!(bm, 0x3, "unexpected base bitmap");
                patch_be64(p, o + 8, 0x0000_0001_0000_0003);
            }
        ),
        header_case!("virtual_size_2p63", plain, &["size", "too big", "too large"], "virtual size 2^63", |p| {
            patch_be64(p, H_SIZE, 1 << 63)
        }),
        header_case!(
            "truncated_to_one_cluster",
            plain,
            &["l1", "refcount", "truncated", "past", "beyond", "end of file", "eof"],
            "file cut to 64 KiB: every table is past EOF",
            |p| truncate_file(p, 0x10000)
        ),
        check_case!(
            "l2_table_is_refcount_block",
            plain,
            &["l2", "refcount", "reference count", "overlap"],
            "L1[0] points at the refcount block",
            |p| {
                let rb = refblock_offset(p);
                patch_be64(p, l1_offset(p), 0x8000_0000_0000_0000 | rb);
            }
        ),
        check_case!(
            "refcount_zero_for_data",
            plain,
            REFCOUNT,
            "refcount of the data cluster at 0x50000 set to 0 (corruption)",
            |p| {
                let rb = refblock_offset(p);
                patch_be16(p, rb + 5 * 2, 0);
            }
        ),
        check_case!(
            "refcount_leak",
            plain,
            REFCOUNT,
            "L2 entry of guest 128 KiB cleared: its data cluster is leaked",
            |p| {
                let o = l2_offset(p);
                assert_eq!(read_be64(p, o + 16), 0x8000_0000_0006_0000);
                patch_be64(p, o + 16, 0);
            }
        ),
    ]
}

/// Generates every malformed image into `dir` (as `NAME.qcow2`) and returns
/// the case descriptions. Needs qemu-img and qemu-io.
pub fn write_corpus(dir: &Path) -> Vec<BadCase> {
    std::fs::create_dir_all(dir).unwrap();
    let bases = make_bases();
    let mut out = Vec::new();
    for spec in specs().into_iter().chain(bitmap_specs()).chain(data_file_specs()) {
        let path = dir.join(format!("{}.qcow2", spec.name));
        match (spec.base)(&bases) {
            Some(b) => {
                std::fs::copy(b, &path).unwrap();
            }
            None => std::fs::write(&path, b"").unwrap(),
        }
        (spec.patch)(&path);
        out.push(BadCase {
            name: spec.name,
            path,
            expect: spec.expect,
            info: spec.info,
            convert: spec.convert,
            check: spec.check,
            what: spec.what,
        });
    }
    out
}

/// The external data file name extension's type.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

const DATA_FILE: &[&str] = &["data file", "data-file", "data_file"];

/// Sets incompatible bit 2 and adds a data file name extension holding `name`.
fn with_data_file(p: &Path, name: &[u8]) {
    let f = read_be64(p, H_INCOMPAT);
    patch_be64(p, H_INCOMPAT, f | 1 << 2);
    add_extension(p, EXT_DATA_FILE, name);
}

/// External data file damage (issue 17): the extension, the bits, and entries a data file
/// does not allow. Every one is refused with a message naming the data file field.
fn data_file_specs() -> Vec<Spec> {
    vec![
        header_case!("data_file_name_empty", plain, DATA_FILE, "bit 2 with an empty data file name extension", |p| {
            with_data_file(p, b"")
        }),
        header_case!(
            "data_file_name_nul",
            plain,
            &["data file", "nul", "could not open"],
            "bit 2 with a data file name that has a NUL byte",
            |p| with_data_file(p, b"/nonexistent/a\0b")
        ),
        header_case!(
            "data_file_name_not_utf8",
            plain,
            &["data file", "utf-8", "could not open"],
            "bit 2 with a data file name that is not UTF-8",
            |p| with_data_file(p, &[b'/', 0xff, 0xfe, b'x'])
        ),
        no_io_case!(
            "data_file_missing",
            plain,
            &["data file", "quring-corpus-missing.raw"],
            "bit 2 with a data file that does not exist",
            |p| with_data_file(p, b"/nonexistent/quring-corpus-missing.raw")
        ),
        header_case!("data_file_ext_twice", plain, DATA_FILE, "two data file name extensions", |p| {
            with_data_file(p, b"/nonexistent/one.raw");
            add_extension(p, EXT_DATA_FILE, b"/nonexistent/two.raw");
        }),
        header_case!(
            "data_file_raw_without_data_file",
            plain,
            &["raw external data", "data-file-raw", "data file"],
            "autoclear bit 1 (raw external data) without incompatible bit 2",
            |p| patch_be64(p, H_AUTOCLEAR, 1 << 1)
        ),
        header_case!(
            "data_file_with_l2less",
            plain,
            &["l2-less", "61"],
            "incompatible bits 2 and 61 (quring L2-less) together",
            |p| {
                with_data_file(p, b"/nonexistent/x.raw");
                patch_be64(p, H_INCOMPAT, 1 << 2 | 1 << 61);
            }
        ),
        header_case!(
            "data_file_name_overruns_cluster",
            plain,
            &["overrun", "extension"],
            "data file name extension whose length runs past the header cluster",
            |p| {
                with_data_file(p, b"/nonexistent/x.raw");
                let (off, _) = find_extension(p, EXT_DATA_FILE).unwrap();
                patch_be32(p, off + 4, 0x20000);
            }
        ),
        data_case!(
            "data_file_compressed_entry",
            compressed,
            &["compressed", "data file"],
            "compressed clusters in an image whose data file is the image itself",
            |p| with_data_file(p, p.to_str().unwrap().as_bytes())
        ),
    ]
}
