//! End-to-end: fio drives the engine through the plugin with `verify=crc32c`, across image
//! modes, queue depths, thread counts and cache modes; after every run `qemu-img check`
//! must return 0. A second test corrupts data behind the plugin and proves fio notices.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn fio(args: &[String]) -> Run {
    let mut c = Command::new("fio");
    c.args(args);
    run_with_timeout(&mut c, std::time::Duration::from_secs(300))
}

struct Case {
    name: &'static str,
    create: &'static str,
    backing: bool,
    iodepth: u32,
    numjobs: u32,
    cache: &'static str,
    /// External data file (file name in the test directory, data_file_raw).
    data_file: Option<(&'static str, bool)>,
}

fn run_case(dir: &Path, c: &Case) {
    let img = dir.join(format!("{}.qcow2", c.name));
    let size_per_job = 16u64 << 20;
    let vsize = size_per_job * c.numjobs as u64 + (4 << 20);
    if c.backing {
        let base = dir.join(format!("{}-base.qcow2", c.name));
        create_qcow2(&base, &Qcow2Opts::default(), vsize);
        qemu_io_cmds(&base, "qcow2", &[format!("write -P 0x5a 0 {vsize}")]);
        let r = quring([
            "create",
            "-q",
            "-b",
            &format!("{}-base.qcow2", c.name),
            "-F",
            "qcow2",
            "-o",
            c.create,
            &s(&img),
            &vsize.to_string(),
        ]);
        assert_eq!(r.status(), 0, "{}", r.describe());
    } else {
        let mut create = c.create.to_string();
        if let Some((name, raw)) = c.data_file {
            create += &format!(",data_file={},data_file_raw={}", s(&dir.join(name)), if raw { "on" } else { "off" });
        }
        let r = quring(["create", "-q", "-o", &create, &s(&img), &vsize.to_string()]);
        assert_eq!(r.status(), 0, "{}", r.describe());
    }
    let mut args = vec![
        format!("--name={}", c.name),
        format!("--ioengine=external:{}", fio_plugin().display()),
        format!("--filename={}", img.display()),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--iodepth={}", c.iodepth),
        format!("--size={size_per_job}"),
        "--verify=crc32c".into(),
        "--verify_state_save=0".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--randrepeat=1".into(),
        format!("--cache={}", c.cache),
    ];
    if c.numjobs > 1 {
        args.push("--thread".into());
        args.push(format!("--numjobs={}", c.numjobs));
        args.push(format!("--offset_increment={size_per_job}"));
    } else {
        args.push("--thread".into());
    }
    let r = fio(&args);
    assert_eq!(r.status(), 0, "[{}] fio failed:\n{}", c.name, r.describe());
    assert!(r.stdout.contains("err= 0"), "[{}] no clean job line:\n{}", c.name, r.describe());
    assert!(!r.stdout.contains("verify:") && !r.stderr.contains("verify:"), "[{}] {}", c.name, r.describe());
    // QEMU cannot open L2-less images: check them with quring, then convert them to the
    // standard layout for qemu-img check.
    let img = if c.create.contains("l2_less=on") {
        let chk = quring(["check", &s(&img)]);
        assert_eq!(chk.status(), 0, "[{}] quring check after fio:\n{}", c.name, chk.describe());
        let std = dir.join(format!("{}-std.qcow2", c.name));
        let r = quring(["convert", "-O", "qcow2", &s(&img), &s(&std)]);
        assert_eq!(r.status(), 0, "{}", r.describe());
        std
    } else {
        img
    };
    let chk = qemu_img(["check", &s(&img)]);
    assert_eq!(chk.status(), 0, "[{}] qemu-img check after fio:\n{}", c.name, chk.describe());
    // A raw external data file is the disk itself.
    if let Some((name, true)) = c.data_file {
        let cmp = qemu_img(["compare", "-f", "qcow2", "-F", "raw", &s(&img), &s(&dir.join(name))]);
        assert_eq!(cmp.status(), 0, "[{}] the raw data file differs from the disk:\n{}", c.name, cmp.describe());
    }
}

#[test]
fn fio_verify_matrix() {
    let dir = tempdir();
    let cases = [
        Case {
            name: "std64k_qd1",
            create: "cluster_size=64k",
            backing: false,
            iodepth: 1,
            numjobs: 1,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "std64k_qd64_2j",
            create: "cluster_size=64k",
            backing: false,
            iodepth: 64,
            numjobs: 2,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "extl2_2m_qd64",
            create: "cluster_size=2M,extended_l2=on",
            backing: false,
            iodepth: 64,
            numjobs: 1,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "extl2_2m_2j",
            create: "cluster_size=2M,extended_l2=on",
            backing: false,
            iodepth: 16,
            numjobs: 2,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "rc1_qd64",
            create: "refcount_bits=1",
            backing: false,
            iodepth: 64,
            numjobs: 1,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "lazy_qd64_2j",
            create: "lazy_refcounts=on",
            backing: false,
            iodepth: 64,
            numjobs: 2,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "overlay_qd64",
            create: "cluster_size=64k",
            backing: true,
            iodepth: 64,
            numjobs: 1,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "overlay_extl2_2j",
            create: "cluster_size=64k,extended_l2=on",
            backing: true,
            iodepth: 8,
            numjobs: 2,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "l2less_qd64_2j",
            create: "l2_less=on,refcount_bits=1",
            backing: false,
            iodepth: 64,
            numjobs: 2,
            cache: "writeback",
            data_file: None,
        },
        Case {
            name: "l2less_wt_qd1",
            create: "l2_less=on",
            backing: false,
            iodepth: 1,
            numjobs: 1,
            cache: "writethrough",
            data_file: None,
        },
        Case {
            name: "wt_qd1",
            create: "cluster_size=64k",
            backing: false,
            iodepth: 1,
            numjobs: 1,
            cache: "writethrough",
            data_file: None,
        },
        Case {
            name: "wt_qd64_rc1",
            create: "refcount_bits=1",
            backing: false,
            iodepth: 64,
            numjobs: 1,
            cache: "writethrough",
            data_file: None,
        },
        Case {
            name: "datafile_qd64_2j",
            create: "cluster_size=64k",
            backing: false,
            iodepth: 64,
            numjobs: 2,
            cache: "writeback",
            data_file: Some(("datafile_qd64_2j.data", false)),
        },
        Case {
            name: "datafile_raw_extl2_wt",
            create: "cluster_size=64k,extended_l2=on",
            backing: false,
            iodepth: 16,
            numjobs: 1,
            cache: "writethrough",
            data_file: Some(("datafile_raw_extl2_wt.data", true)),
        },
    ];
    for c in &cases {
        run_case(dir.path(), c);
    }
}

/// Data changed behind the plugin's back must make fio's verify fail: the check can fail.
#[test]
fn fio_detects_corruption() {
    let dir = tempdir();
    let img = dir.path().join("c.qcow2");
    let r = quring(["create", "-q", &s(&img), "16M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let base = vec![
        "--name=c".to_string(),
        format!("--ioengine=external:{}", fio_plugin().display()),
        format!("--filename={}", img.display()),
        "--thread".into(),
        "--rw=write".into(),
        "--bs=4k".into(),
        "--size=4m".into(),
        "--verify=crc32c".into(),
        "--verify_state_save=0".into(),
        "--verify_fatal=1".into(),
    ];
    let mut write = base.clone();
    write.push("--do_verify=0".into());
    let r = fio(&write);
    assert_eq!(r.status(), 0, "{}", r.describe());
    // Find the host offset of guest offset 1 MiB and flip bytes there.
    let map = qemu_img(["map", "--output=json", &s(&img)]);
    let v: serde_json::Value = serde_json::from_str(&map.stdout).expect("map json");
    let host = v
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| {
            let (st, len) = (e["start"].as_u64()?, e["length"].as_u64()?);
            let off = e["offset"].as_u64()?;
            (e["data"].as_bool()? && st <= (1 << 20) && (1 << 20) < st + len).then_some(off + (1 << 20) - st)
        })
        .expect("guest 1 MiB is mapped");
    patch_bytes(&img, host + 100, &[0xde, 0xad, 0xbe, 0xef]);
    let mut verify = base.clone();
    verify.push("--verify_only".into());
    let r = fio(&verify);
    assert_ne!(r.status(), 0, "fio must fail on corrupted data:\n{}", r.describe());
    assert!(r.stdout.contains("verify") || r.stderr.contains("verify"), "{}", r.describe());
}
