//! A real guest on `quring serve --vhost-user-blk`: Debian's qemu-system-x86_64 (TCG) boots
//! Debian's kernel with a busybox initramfs (scripts/build-guest.sh) whose init writes a
//! pattern through /dev/vda at fixed offsets (buffered, O_DIRECT, 512-byte requests, a
//! discard, two writers in parallel on two CPUs), flushes, reads the disk back and prints its
//! md5 on the serial console. Then: the checksum must match a raw reference built here from
//! the same pattern at the same offsets, `qemu-img check` must pass and `qemu-img compare`
//! must find the image identical to the reference. Single queue and two queues, on a
//! standard and on an extended_l2 image.
//!
//! Also runs `engine/examples/virtio_blk_loop.rs`.

mod common;

use common::*;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// One boot plus workload takes ~15 s here; this bounds a wedged guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds the guest once per test binary (the script itself caches in target/guest).
fn guest() -> &'static PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = repo_root();
        let out = root.join("target").join("guest");
        let r = run_with_timeout(
            Command::new("sh").arg(root.join("scripts/build-guest.sh")).arg(&out),
            Duration::from_secs(900),
        );
        assert!(r.success(), "build-guest.sh failed: {}", r.describe());
        out
    })
}

/// Guests run one at a time: two cores, and TCG guests are CPU bound.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the guest's init writes (see scripts/build-guest.sh), applied to a raw buffer.
fn reference(pattern: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; DISK as usize];
    let mut put = |off: u64| d[off as usize..off as usize + pattern.len()].copy_from_slice(pattern);
    put(0);
    put(3 * MIB + 4 * KIB);
    put(10 * MIB + 1536);
    put(20 * MIB);
    for n in 0..8 {
        put((32 + n) * MIB);
        put((48 + n) * MIB);
    }
    let z = (20 * MIB + 256 * KIB) as usize;
    d[z..z + 256 * KIB as usize].fill(0);
    d
}

fn md5sum(path: &Path) -> String {
    let r = run(Command::new("md5sum").arg(path)).ok();
    r.stdout.split_whitespace().next().unwrap_or_default().to_string()
}

/// Waits for a child for up to `limit`, then SIGTERMs and finally kills it.
fn wait_child(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    let mut termed = false;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if !termed && start.elapsed() > limit {
            termed = true;
            // SAFETY: kill(2) on our own unwaited child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        } else if start.elapsed() > limit * 2 {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn guest_case(name: &str, create_opts: &str, queues: u32) {
    let g = guest();
    let _one = serial();
    let dir = tempdir();
    let img = dir.path().join(format!("{name}.qcow2"));
    let sock = dir.path().join("vhost.sock");
    qemu_img(["create", "-q", "-f", "qcow2", "-o", create_opts, &s(&img), &DISK.to_string()]).ok();

    let log = dir.path().join("serve.log");
    let mut server = Command::new(quring_bin())
        .args(["serve", "--vhost-user-blk", &s(&sock), "--queues", &queues.to_string(), &s(&img)])
        .stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn quring serve");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(st) = server.try_wait().unwrap() {
            panic!("quring serve exited early ({st}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket from quring serve");
        std::thread::sleep(Duration::from_millis(20));
    }

    let boot = Instant::now();
    let q = run_with_timeout(
        Command::new("qemu-system-x86_64").args([
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-smp",
            &queues.max(1).to_string(),
            "-m",
            "512",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            &format!("socket,id=c0,path={}", s(&sock)),
            "-device",
            &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
            "-kernel",
            &s(&g.join("vmlinuz")),
            "-initrd",
            &s(&g.join("initrd.gz")),
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]),
        GUEST_TIMEOUT,
    );
    let guest_secs = boot.elapsed().as_secs_f64();
    let st = wait_child(&mut server, Duration::from_secs(30));
    let slog = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("[{name}] guest ran {guest_secs:.1}s\n{}\n{slog}", q.stdout);
    assert!(!q.timed_out, "[{name}] guest timed out: {}", q.describe());
    assert!(q.stdout.contains("QURING-DONE"), "[{name}] guest did not finish: {}\n{slog}", q.describe());
    assert!(!q.stdout.contains("QURING-FAIL"), "[{name}] guest step failed: {}", q.stdout);
    assert!(st.success(), "[{name}] quring serve: {st}\n{slog}");
    assert!(slog.contains("image closed"), "[{name}] no clean close:\n{slog}");
    assert!(q.stdout.contains(&format!("QURING-SIZE {DISK}")), "[{name}] capacity: {}", q.stdout);
    assert!(q.stdout.contains("QURING-SERIAL quring"), "[{name}] GET_ID: {}", q.stdout);
    assert!(q.stdout.contains(&format!("QURING-QUEUES {queues} ")), "[{name}] queues: {}", q.stdout);

    let mut pattern = Vec::new();
    File::open(g.join("pattern.bin")).unwrap().read_to_end(&mut pattern).unwrap();
    let raw = dir.path().join("ref.raw");
    std::fs::write(&raw, reference(&pattern)).unwrap();
    let want = md5sum(&raw);
    let got = q.stdout.lines().find_map(|l| l.trim().strip_prefix("QURING-CHECKSUM ")).unwrap_or("");
    assert_eq!(got.trim(), want, "[{name}] guest checksum");

    let c = qemu_img(["check", &s(&img)]);
    assert_eq!(c.status(), 0, "[{name}] qemu-img check: {}", c.describe());
    let c = qemu_img(["compare", "-f", "raw", "-F", "qcow2", &s(&raw), &s(&img)]);
    assert_eq!(c.status(), 0, "[{name}] qemu-img compare: {}", c.describe());

    // Per-queue evidence from the server: with two queues, both carried writes, on two
    // threads, and at some point both had requests in flight.
    let stats: Vec<(u64, u64)> = slog
        .lines()
        .filter(|l| l.starts_with("quring serve: queue "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let field = |k: &str| w.iter().position(|x| *x == k).map(|i| w[i + 1].parse::<u64>().unwrap()).unwrap();
            (field("tid"), field("writes"))
        })
        .collect();
    assert_eq!(stats.len(), queues as usize, "[{name}] per-queue summary:\n{slog}");
    if queues > 1 {
        assert!(stats.iter().all(|&(_, w)| w > 0), "[{name}] a queue carried no writes:\n{slog}");
        assert_ne!(stats[0].0, stats[1].0, "[{name}] queues served by one thread:\n{slog}");
        assert!(slog.contains("max busy queues at once 2"), "[{name}] queues never busy together:\n{slog}");
    }
}

#[test]
fn guest_standard_1q() {
    guest_case("std-1q", "cluster_size=65536", 1);
}

#[test]
fn guest_standard_2q() {
    guest_case("std-2q", "cluster_size=65536", 2);
}

#[test]
fn guest_extended_l2_1q() {
    guest_case("ext-1q", "extended_l2=on,cluster_size=65536", 1);
}

#[test]
fn guest_extended_l2_2q() {
    guest_case("ext-2q", "extended_l2=on,cluster_size=65536", 2);
}

/// The example, through `cargo run` (which rebuilds it when the engine changed).
#[test]
fn example_virtio_blk_loop() {
    let dir = tempdir();
    let img = dir.path().join("ex.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", &s(&img), "64M"]).ok();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo_root()).args(["run", "-q", "-p", "quring", "--example", "virtio_blk_loop", "--"]);
    let r = run_with_timeout(cmd.arg(&img), Duration::from_secs(300));
    assert!(r.success(), "example failed: {}", r.describe());
    assert!(r.stdout.contains("virtio_blk_loop: ok"), "{}", r.describe());
    let c = qemu_img(["check", &s(&img)]);
    assert_eq!(c.status(), 0, "qemu-img check after the example: {}", c.describe());
}
