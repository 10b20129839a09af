//! The planner against `qemu-img create`: byte-identical files over the option matrix.

use super::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn write_plan(p: &CreatePlan, path: &Path, mode: Preallocation) {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::create(path).unwrap();
    for &(off, len) in &p.data_ranges {
        match mode {
            Preallocation::Falloc => {
                // SAFETY: plain fallocate on an owned descriptor.
                let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off as i64, len as i64) };
                assert_eq!(r, 0, "fallocate");
            }
            Preallocation::Full => {
                f.seek(SeekFrom::Start(off)).unwrap();
                let zeros = vec![0u8; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n]).unwrap();
                    left -= n as u64;
                }
            }
            _ => panic!("data ranges without falloc/full"),
        }
    }
    for (off, d) in &p.writes {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(d).unwrap();
    }
    f.set_len(p.file_len).unwrap();
}

fn qemu_opts(o: &CreateOptions) -> String {
    let mut v = vec![
        format!("cluster_size={}", o.cluster_size),
        format!("refcount_bits={}", o.refcount_bits),
        format!("preallocation={}", o.preallocation.name()),
        format!("compression_type={}", o.compression.name()),
    ];
    if o.extended_l2 {
        v.push("extended_l2=on".into());
    }
    if o.lazy_refcounts {
        v.push("lazy_refcounts=on".into());
    }
    if o.compat_v2 {
        v.push("compat=0.10".into());
    }
    v.join(",")
}

fn qemu_create(o: &CreateOptions, path: &Path) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", "-o", &qemu_opts(o)]);
    if let Some(b) = &o.backing_file {
        c.args(["-u", "-b", b]);
    }
    if let Some(f) = &o.backing_fmt {
        c.args(["-F", f]);
    }
    c.arg(path).arg(o.size.to_string());
    let out = c.output().unwrap();
    assert!(out.status.success(), "qemu-img create {o:?}: {out:?}");
}

struct Pair {
    _dir: tempfile::TempDir,
    ours: PathBuf,
    theirs: PathBuf,
}

fn make_pair(o: &CreateOptions) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("qemu.qcow2");
    let plan = plan_create(o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
    write_plan(&plan, &ours, o.preallocation);
    qemu_create(o, &theirs);
    Pair { _dir: dir, ours, theirs }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

fn assert_identical(o: &CreateOptions) {
    let p = make_pair(o);
    let a = std::fs::read(&p.ours).unwrap();
    let b = std::fs::read(&p.theirs).unwrap();
    if let Some(i) = first_diff(&a, &b) {
        panic!("{o:?}: differs from qemu-img at {i:#x} (ours {} bytes, qemu {} bytes)", a.len(), b.len());
    }
    check_clean(&p.ours);
}

fn check_clean(path: &Path) {
    // Check without opening the backing file (it does not exist).
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        path.display()
    );
    let out = Command::new("qemu-img").args(["check", "-q", &spec]).output().unwrap();
    assert!(out.status.success(), "qemu-img check {path:?}: {out:?}");
}

fn json(args: &[&str], path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img").args(args).arg("--output=json").arg(path).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn opts(size: u64) -> CreateOptions {
    CreateOptions { size, ..Default::default() }
}

#[test]
fn identical_sizes_and_cluster_sizes() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for size in [0u64, 1 << 20, 1 << 30, 100 << 30, 1 << 40, 1000] {
            let o = CreateOptions { cluster_size: cs, ..opts(size) };
            if plan_create(&o).is_err() {
                // 512-byte clusters cannot describe 1 TiB; qemu-img refuses too.
                assert!(cs == 512 && size == 1 << 40, "{o:?}");
                continue;
            }
            assert_identical(&o);
        }
    }
}

#[test]
fn identical_refcount_widths() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        for (cs, size) in [(65536u64, 1u64 << 30), (512, 1 << 30), (512, 16 << 30), (4096, 100 << 30)] {
            assert_identical(&CreateOptions { refcount_bits: bits, cluster_size: cs, ..opts(size) });
        }
    }
}

#[test]
fn identical_features() {
    let base = opts(10 << 30);
    let cases = vec![
        CreateOptions { extended_l2: true, ..base.clone() },
        CreateOptions { extended_l2: true, cluster_size: 16384, ..base.clone() },
        CreateOptions { extended_l2: true, cluster_size: 2 << 20, refcount_bits: 1, ..base.clone() },
        CreateOptions { lazy_refcounts: true, ..base.clone() },
        CreateOptions { compat_v2: true, ..base.clone() },
        CreateOptions { compat_v2: true, cluster_size: 512, ..base.clone() },
        CreateOptions { compression: CompressionType::Zstd, ..base.clone() },
        CreateOptions { backing_file: Some("base.qcow2".into()), backing_fmt: Some("qcow2".into()), ..base.clone() },
        CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_fmt: Some("raw".into()),
            compat_v2: true,
            ..base.clone()
        },
        CreateOptions {
            extended_l2: true,
            lazy_refcounts: true,
            compression: CompressionType::Zstd,
            refcount_bits: 64,
            backing_file: Some("b.img".into()),
            backing_fmt: Some("raw".into()),
            ..base.clone()
        },
    ];
    for o in cases {
        assert_identical(&o);
    }
}

#[test]
fn backing_without_format() {
    // qemu-img 10 insists on -F, so compare with its image minus the format extension:
    // the same layout, the name right after the end-of-extensions marker.
    let o = CreateOptions { backing_file: Some("/some/base.raw".into()), ..opts(10 << 30) };
    let p = plan_create(&o).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.qcow2");
    write_plan(&p, &path, Preallocation::Off);
    check_clean(&path);
    let info = json(&["info", "-U"], &path);
    assert_eq!(info["backing-filename"], "/some/base.raw");
    assert!(info.get("backing-filename-format").is_none(), "{info}");
    let with_fmt = plan_create(&CreateOptions { backing_fmt: Some("raw".into()), ..o.clone() }).unwrap();
    assert_eq!(p.writes[1..], with_fmt.writes[1..]);
    assert_eq!(p.file_len, with_fmt.file_len);
}

fn check_prealloc(o: &CreateOptions) {
    let p = make_pair(o);
    check_clean(&p.ours);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&p.ours)
        .arg(&p.theirs)
        .status()
        .unwrap();
    assert!(cmp.success(), "{o:?}: qemu-img compare");
    let (a, b) = (json(&["info"], &p.ours), json(&["info"], &p.theirs));
    for k in ["virtual-size", "cluster-size", "format"] {
        assert_eq!(a[k], b[k], "{o:?}: info {k}");
    }
    assert_eq!(a["format-specific"], b["format-specific"], "{o:?}");
    let same = std::fs::read(&p.ours).unwrap() == std::fs::read(&p.theirs).unwrap();
    assert!(same, "{o:?}: not byte-identical to qemu-img");
    let (ma, mb) = (json(&["map"], &p.ours), json(&["map"], &p.theirs));
    assert_eq!(ma, mb, "{o:?}: qemu-img map");
    if !o.extended_l2 && o.size > 0 {
        assert!(ma.as_array().unwrap().iter().all(|e| e["data"] == true), "{o:?}: {ma}");
    }
}

#[test]
fn preallocation_modes() {
    for mode in [Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
        for (cs, size, bits, ext) in [
            (65536u64, 0u64, 16u32, false),
            (65536, 1000000, 16, false),
            (65536, 256 << 20, 16, false),
            (512, 8 << 20, 64, false),
            (4096, 48 << 20, 1, false),
            (65536, 256 << 20, 16, true),
            (2 << 20, 1 << 30, 8, false),
            (16384, 256 << 20, 2, true),
            (512, 16 << 20, 16, false),
        ] {
            // Full writes every data byte: keep it small.
            let size = if mode == Preallocation::Full { size.min(16 << 20) } else { size };
            let o = CreateOptions {
                cluster_size: cs,
                refcount_bits: bits,
                extended_l2: ext,
                preallocation: mode,
                ..opts(size)
            };
            check_prealloc(&o);
        }
    }
}

#[test]
fn preallocation_with_backing_and_extended_l2() {
    for mode in [Preallocation::Metadata, Preallocation::Falloc] {
        assert_identical(&CreateOptions {
            extended_l2: true,
            preallocation: mode,
            backing_file: Some("base.raw".into()),
            backing_fmt: Some("raw".into()),
            ..opts(1 << 30)
        });
    }
}

#[test]
fn refuses_bad_options() {
    let cases: Vec<(CreateOptions, &str)> = vec![
        (CreateOptions { cluster_size: 1000, ..opts(1) }, "power of two between 512"),
        (CreateOptions { cluster_size: 256, ..opts(1) }, "power of two between 512"),
        (CreateOptions { cluster_size: 4 << 20, ..opts(1) }, "power of two between 512"),
        (CreateOptions { refcount_bits: 3, ..opts(1) }, "Refcount width"),
        (CreateOptions { refcount_bits: 0, ..opts(1) }, "Refcount width"),
        (CreateOptions { refcount_bits: 128, ..opts(1) }, "Refcount width"),
        (CreateOptions { extended_l2: true, cluster_size: 8192, ..opts(1) }, "at least 16384"),
        (CreateOptions { compat_v2: true, extended_l2: true, ..opts(1) }, "compatibility level 1.1"),
        (CreateOptions { compat_v2: true, lazy_refcounts: true, ..opts(1) }, "Lazy refcounts"),
        (CreateOptions { compat_v2: true, refcount_bits: 8, ..opts(1) }, "refcount widths"),
        (CreateOptions { compat_v2: true, compression: CompressionType::Zstd, ..opts(1) }, "Non-zlib"),
        (CreateOptions { compat_v2: true, l2_less: true, ..opts(1) }, "L2-less"),
        (CreateOptions { backing_fmt: Some("raw".into()), ..opts(1) }, "without backing file"),
        (
            CreateOptions { backing_file: Some("b".into()), preallocation: Preallocation::Metadata, ..opts(1) },
            "extended_l2",
        ),
        (CreateOptions { backing_file: Some("x".repeat(1024)), ..opts(1) }, "longer"),
        (CreateOptions { backing_file: Some("x".repeat(600)), cluster_size: 512, ..opts(1) }, "more than one cluster"),
        (CreateOptions { cluster_size: 512, ..opts(1 << 62) }, "too large"),
        (CreateOptions { ..opts(u64::MAX) }, "exceeds maximum"),
        (CreateOptions { ..opts(1 << 63) }, "exceeds maximum"),
        (CreateOptions { cluster_size: 2 << 20, preallocation: Preallocation::Metadata, ..opts(1 << 60) }, "limit"),
    ];
    for (o, want) in cases {
        let e = plan_create(&o).unwrap_err().to_string();
        assert!(e.contains(want), "{o:?}: {e}");
    }
}

#[test]
fn l2_less_sets_bit_and_name() {
    let p = plan_create(&CreateOptions { l2_less: true, ..opts(1 << 30) }).unwrap();
    assert_ne!(p.header.incompatible_features & feature::INCOMPAT_L2LESS, 0);
    let t = p.header.feature_table().unwrap();
    assert!(t.iter().any(|f| f.bit == 61 && f.name.contains("l2-less")));
    let (off, d) = &p.writes[0];
    assert_eq!(*off, 0);
    let mut d = d.clone();
    d.resize(65536, 0);
    let h = Header::parse(&d, p.file_len).unwrap();
    assert_eq!(h, p.header);
}

fn any_options() -> impl Strategy<Value = CreateOptions> {
    (
        9u32..=21,
        0u32..=6,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![0u64..(1 << 20), 0u64..(1 << 34), any::<u64>()],
    )
        .prop_map(|(cb, order, ext, lazy, v2, pre, zstd, backing, size)| CreateOptions {
            size,
            cluster_size: 1 << cb,
            extended_l2: ext,
            refcount_bits: 1 << order,
            lazy_refcounts: lazy,
            compat_v2: v2,
            preallocation: [Preallocation::Off, Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full]
                [pre as usize],
            backing_file: backing.then(|| "base.img".to_string()),
            backing_fmt: None,
            compression: if zstd { CompressionType::Zstd } else { CompressionType::Deflate },
            l2_less: false,
            // quring's identity extension on some plans (it must parse back).
            identity: lazy.then(crate::format::identity::Identity::generate),
            data_file: None,
            data_file_raw: false,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn plans_are_sane(o in any_options()) {
        // Keep preallocated plans small enough for a unit test.
        let mut o = o;
        if o.preallocation != Preallocation::Off {
            o.size %= 64 << (o.cluster_size.trailing_zeros() - 9 + 10);
        }
        let Ok(p) = plan_create(&o) else { return Ok(()); };
        let mut end = 0u64;
        for (off, d) in &p.writes {
            prop_assert!(*off >= end, "overlapping writes at {off:#x}");
            prop_assert!(!d.is_empty());
            end = off + d.len() as u64;
            prop_assert!(end <= p.file_len);
        }
        for (off, len) in &p.data_ranges {
            prop_assert!(off + len <= p.file_len);
            prop_assert!(p.writes.iter().all(|(w, d)| w + d.len() as u64 <= *off || *w >= off + len));
        }
        let (off, d) = &p.writes[0];
        prop_assert_eq!(*off, 0);
        let mut d = d.clone();
        d.resize(o.cluster_size as usize, 0);
        let h = Header::parse(&d, p.file_len).unwrap();
        prop_assert_eq!(h.size, o.size.next_multiple_of(512));
    }
}
