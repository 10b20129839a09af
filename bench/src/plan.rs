//! Command lines: image preparation and the benchmark command of each side.

use crate::config::{ImageState, Mode, Pattern, QuringDriver, Side, Workload};
use crate::stats::{scatter_step, step_period};
use std::path::{Path, PathBuf};

/// The programs the runner calls.
#[derive(Clone, Debug)]
pub struct Tools {
    pub quring: PathBuf,
    pub plugin: PathBuf,
    pub fio: String,
    pub qemu_img: String,
    pub qemu_io: String,
}

/// Quote a word for a POSIX shell when needed.
pub fn shell_quote(w: &str) -> String {
    let plain = !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.,/:@+%".contains(&b));
    if plain { w.to_string() } else { format!("'{}'", w.replace('\'', "'\\''")) }
}

pub fn shell_join(argv: &[String]) -> String {
    argv.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

/// Switch to `quring create` for every mode once it exists (TODO: turn on when the engine's
/// create lands; the issue asks for images made by quring).
pub const CREATE_WITH_QURING: bool = true;

/// THE image creation command: a fresh qcow2 image of `mode`, optionally over a raw backing
/// file. qemu-img makes it until `quring create` exists; modes qemu-img does not know
/// (L2-less) always go through `quring create`.
pub fn create_qcow2(t: &Tools, mode: &Mode, path: &Path, size: u64, backing: Option<&Path>) -> Vec<String> {
    let mut v = if CREATE_WITH_QURING || mode.quring_only {
        vec![p(&t.quring), s("create"), s("-f"), s("qcow2")]
    } else {
        vec![s(&t.qemu_img), s("create"), s("-q"), s("-f"), s("qcow2")]
    };
    let mut opts = s(mode.create_opts);
    if mode.data_file_raw {
        // QEMU refuses data_file_raw with a backing file: an overlay keeps its data in an
        // external file that is not raw-consistent (the nearest layout QEMU allows).
        let raw = if backing.is_some() { "off" } else { "on" };
        opts += &format!(",data_file={},data_file_raw={raw}", p(&data_file_of(path)));
    }
    v.extend([s("-o"), opts]);
    if let Some(b) = backing {
        v.extend([s("-b"), p(b), s("-F"), s("raw")]);
    }
    v.extend([p(path), s(size)]);
    v
}

/// The external data file of image `path` in a data-file mode (removed with the image).
pub fn data_file_of(path: &Path) -> std::path::PathBuf {
    let mut f = path.as_os_str().to_owned();
    f.push(".data");
    f.into()
}

/// A sparse raw file.
pub fn create_raw(path: &Path, size: u64) -> Vec<String> {
    vec![s("truncate"), s("-s"), s(size), p(path)]
}

/// Write 0x5a over the whole image (allocating every cluster of a qcow2), in 1 GiB requests;
/// with qemu-io, or with `quring io` for layouts only quring knows.
pub fn fill(t: &Tools, format: &str, path: &Path, size: u64, with_quring: bool) -> Vec<String> {
    let mut v = if with_quring { vec![p(&t.quring), s("io")] } else { vec![s(&t.qemu_io), s("-f"), s(format)] };
    let chunk = 1u64 << 30;
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        v.extend([s("-c"), format!("write -P 0x5a {off} {len}")]);
        off += len;
    }
    v.push(p(path));
    v
}

/// The offset step for qemu-img bench / quring bench.
pub fn step(w: &Workload, size: u64) -> u64 {
    match w.pattern {
        Pattern::Random => scatter_step(size, w.bs),
        Pattern::Sequential => w.bs,
    }
}

/// Request count for a count-based run: `seconds` worth at the calibrated (or assumed) IOPS,
/// capped for single-pass workloads so that no block is written twice.
pub fn count(w: &Workload, size: u64, seconds: f64, calibrated_iops: Option<f64>) -> u64 {
    let iops = calibrated_iops.filter(|x| x.is_finite() && *x > 0.0).unwrap_or(w.assumed_iops as f64);
    let want = ((iops * seconds).round() as u64).max(u64::from(w.depth) * 4).max(64);
    if w.single_pass { want.min(step_period(size, w.bs, step(w, size))) } else { want }
}

pub fn driver_name(side: Side, driver: QuringDriver) -> &'static str {
    match (side, driver) {
        (Side::Quring, QuringDriver::Bench) => "quring bench",
        (Side::Quring, QuringDriver::Fio) => "fio+quring plugin",
        (Side::Raw, _) => "fio io_uring",
        (Side::Qemu, _) => "qemu-img bench",
    }
}

/// Whether a side's runs are bounded by a request count (else by time).
pub fn count_based(side: Side, driver: QuringDriver) -> bool {
    matches!((side, driver), (Side::Qemu, _) | (Side::Quring, QuringDriver::Bench))
}

fn fio_common(w: &Workload, seconds: f64, seed: u64) -> Vec<String> {
    let rw = match (w.pattern, w.write) {
        (Pattern::Random, false) => "randread",
        (Pattern::Random, true) => "randwrite",
        (Pattern::Sequential, false) => "read",
        (Pattern::Sequential, true) => "write",
    };
    let mut v = vec![
        format!("--rw={rw}"),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.depth),
        format!("--randseed={seed}"),
        s("--randrepeat=1"),
        // Both sides on one clock: left to itself fio picks the TSC or clock_gettime per
        // run (its TSC check is a race between CPUs), and the vDSO clock read took 19% of
        // fio's user time in one plugin run against 4.5% with the TSC.
        s("--clocksource=cpu"),
    ];
    if !w.single_pass {
        v.push(s("--time_based=1"));
        if w.pattern == Pattern::Random {
            v.push(s("--norandommap=1"));
        }
    }
    v.push(format!("--runtime={}ms", (seconds * 1000.0).round() as u64));
    v.push(s("--output-format=json"));
    v
}

/// The benchmark command of one side.
#[allow(clippy::too_many_arguments)]
pub fn run_command(
    t: &Tools,
    side: Side,
    driver: QuringDriver,
    w: &Workload,
    image: &Path,
    size: u64,
    count: u64,
    seconds: f64,
    seed: u64,
) -> Vec<String> {
    let cache = if w.writethrough { "directsync" } else { "none" };
    let bench_opts = |v: &mut Vec<String>| {
        v.extend([
            s("-c"),
            s(count),
            s("-d"),
            s(w.depth),
            s("-s"),
            s(w.bs),
            s("-S"),
            s(step(w, size)),
            s("-o"),
            s("0"),
            s("-t"),
            s(cache),
        ]);
        if w.write {
            v.push(s("-w"));
        }
    };
    match (side, driver) {
        (Side::Quring, QuringDriver::Bench) => {
            let mut v = vec![p(&t.quring), s("bench")];
            bench_opts(&mut v);
            v.extend([s("--counters"), p(image)]);
            v
        }
        (Side::Quring, QuringDriver::Fio) => {
            let mut v = vec![
                s(&t.fio),
                format!("--name={}", w.id),
                format!("--filename={}", p(image)),
                format!("--ioengine=external:{}", p(&t.plugin)),
                s("--thread=1"),
            ];
            if w.writethrough {
                v.push(s("--cache=writethrough"));
            }
            v.extend(fio_common(w, seconds, seed));
            v
        }
        (Side::Raw, _) => {
            let mut v = vec![
                s(&t.fio),
                format!("--name={}", w.id),
                format!("--filename={}", p(image)),
                s("--ioengine=io_uring"),
                s("--direct=1"),
                // The same threading model as the plugin side (which needs threads).
                s("--thread=1"),
            ];
            if w.writethrough {
                v.push(s("--sync=dsync"));
            }
            v.extend(fio_common(w, seconds, seed));
            v
        }
        (Side::Qemu, _) => {
            let mut v = vec![s(&t.qemu_img), s("bench"), s("-f"), s("qcow2"), s("-i"), s("io_uring")];
            bench_opts(&mut v);
            v.push(p(image));
            v
        }
    }
}

/// Which offsets a side visits, for the report.
pub fn pattern_description(side: Side, driver: QuringDriver, w: &Workload, size: u64, seed: u64) -> String {
    let stepped = |who: &str| {
        let st = step(w, size);
        let what = match w.pattern {
            Pattern::Random => format!(
                "step pattern (scattered): offset += {st} ({} x {}) mod (size - {}), from 0; {} distinct offsets",
                st / w.bs,
                w.bs,
                w.bs,
                step_period(size, w.bs, st)
            ),
            Pattern::Sequential => format!("sequential from 0, step {st}"),
        };
        let bound = if w.single_pass {
            "request count capped so no offset repeats"
        } else {
            "request count calibrated to the run time"
        };
        format!("{who}: {what}; {bound}")
    };
    let fio = |who: &str| {
        let what = match (w.pattern, w.single_pass) {
            (Pattern::Random, false) => format!("uniform random offsets (norandommap), randseed={seed}, time-based"),
            (Pattern::Random, true) => {
                format!(
                    "random offsets, each block at most once (random map), randseed={seed}, until the file is covered or the run time ends"
                )
            }
            (Pattern::Sequential, false) => "sequential, wrapping at the end, time-based".to_string(),
            (Pattern::Sequential, true) => {
                "sequential, one pass, until the file is covered or the run time ends".to_string()
            }
        };
        let base = match (side, w.image) {
            (Side::Raw, ImageState::Overlay) => {
                "; the raw baseline overwrites a full raw file (raw has no backing file)"
            }
            (Side::Raw, ImageState::Empty) => "; on a fresh sparse raw file",
            _ => "",
        };
        format!("{who}: {what}{base}")
    };
    match (side, driver) {
        (Side::Quring, QuringDriver::Bench) => stepped("quring bench"),
        (Side::Quring, QuringDriver::Fio) => fio("fio + quring plugin"),
        (Side::Raw, _) => fio("fio io_uring O_DIRECT"),
        (Side::Qemu, _) => stepped("qemu-img bench"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{mode, workload};

    fn tools() -> Tools {
        Tools {
            quring: "/t/quring".into(),
            plugin: "/t/libquring_fio.so".into(),
            fio: "fio".into(),
            qemu_img: "qemu-img".into(),
            qemu_io: "qemu-io".into(),
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a-b=c/d"), "a-b=c/d");
        assert_eq!(shell_quote("write -P 0x5a 0 1"), "'write -P 0x5a 0 1'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn commands() {
        let t = tools();
        let w = workload("randread-4k").unwrap();
        let size = 256 << 20;
        let img = Path::new("/x/a.qcow2");
        let q = shell_join(&run_command(&t, Side::Qemu, QuringDriver::Bench, w, img, size, 1000, 2.0, 7));
        assert_eq!(q, "qemu-img bench -f qcow2 -i io_uring -c 1000 -d 32 -s 4096 -S 1060864 -o 0 -t none /x/a.qcow2");
        let r = shell_join(&run_command(&t, Side::Quring, QuringDriver::Bench, w, img, size, 1000, 2.0, 7));
        assert_eq!(r, "/t/quring bench -c 1000 -d 32 -s 4096 -S 1060864 -o 0 -t none --counters /x/a.qcow2");
        let wt = workload("wt-alloc-qd1").unwrap();
        let f =
            shell_join(&run_command(&t, Side::Raw, QuringDriver::Bench, wt, Path::new("/x/r.raw"), size, 0, 1.5, 7));
        assert_eq!(
            f,
            "fio --name=wt-alloc-qd1 --filename=/x/r.raw --ioengine=io_uring --direct=1 --thread=1 --sync=dsync \
             --rw=randwrite --bs=4096 --iodepth=1 --randseed=7 --randrepeat=1 --clocksource=cpu --runtime=1500ms \
             --output-format=json"
        );
        let g = shell_join(&run_command(&t, Side::Quring, QuringDriver::Fio, wt, img, size, 0, 1.5, 7));
        assert!(g.starts_with("fio --name=wt-alloc-qd1 --filename=/x/a.qcow2 --ioengine=external:/t/libquring_fio.so --thread=1 --cache=writethrough --rw=randwrite"), "{g}");
        let q = shell_join(&run_command(&t, Side::Qemu, QuringDriver::Bench, wt, img, size, 10, 1.5, 7));
        assert!(q.contains("-t directsync -w /x/a.qcow2"), "{q}");
    }

    #[test]
    fn image_commands() {
        let t = tools();
        let m = mode("xl2-2m").unwrap();
        assert_eq!(
            shell_join(&create_qcow2(&t, m, Path::new("/x/o.qcow2"), 1 << 30, Some(Path::new("/x/b.raw")))),
            "/t/quring create -f qcow2 -o cluster_size=2M,extended_l2=on -b /x/b.raw -F raw /x/o.qcow2 1073741824"
        );
        let l = mode("l2less").unwrap();
        assert!(create_qcow2(&t, l, Path::new("/x/l.qcow2"), 1 << 20, None)[..2].join(" ").ends_with("quring create"));
        assert_eq!(
            shell_join(&fill(&t, "qcow2", Path::new("/x/l"), 4096, true)),
            "/t/quring io -c 'write -P 0x5a 0 4096' /x/l"
        );
        assert_eq!(
            shell_join(&fill(&t, "qcow2", Path::new("/x/a"), (2 << 30) + 4096, false)),
            "qemu-io -f qcow2 -c 'write -P 0x5a 0 1073741824' -c 'write -P 0x5a 1073741824 1073741824' \
             -c 'write -P 0x5a 2147483648 4096' /x/a"
        );
    }

    #[test]
    fn counts() {
        let size = 256 << 20;
        let r = workload("randread-4k").unwrap();
        assert_eq!(count(r, size, 2.0, None), 200_000);
        assert_eq!(count(r, size, 2.0, Some(150_000.4)), 300_001);
        assert_eq!(count(r, size, 2.0, Some(f64::NAN)), 200_000);
        let ft = workload("firsttouch-4k").unwrap();
        assert_eq!(count(ft, size, 10.0, Some(1e6)), 65535);
        let qd1 = workload("wt-alloc-qd1").unwrap();
        assert_eq!(count(qd1, size, 0.001, Some(1.0)), 64);
    }
}
