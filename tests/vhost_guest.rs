//! A real guest on `quring serve --vhost-user-blk`: Debian's qemu-system-x86_64 (TCG) boots
//! Debian's kernel with a busybox initramfs (scripts/build-guest.sh) whose init writes a
//! pattern through /dev/vda at fixed offsets (buffered, O_DIRECT, 512-byte requests, a
//! discard, two writers in parallel on two CPUs), flushes, reads the disk back and prints its
//! md5 on the serial console. Then: the checksum must match a raw reference built here from
//! the same pattern at the same offsets, `qemu-img check` must pass and `qemu-img compare`
//! must find the image identical to the reference. Single queue and two queues, on a
//! standard and on an extended_l2 image.
//!
//! `guest_discard_and_resize`: one boot with two disks (a standard and an extended-L2
//! image, each on its own `quring serve --discard=unmap --detect-zeroes=unmap --control`):
//! the guest discards (blkdiscard), punches holes and zeroes ranges (util-linux's
//! fallocate), writes zeros, and checksums; then the host resizes both images live through
//! the control sockets and the guest must see the new sizes in /sys/block/vdX/size and
//! use the grown range. Afterwards `qemu-img map` must show the discarded and zeroed
//! ranges as zeros without data and their neighbours as data, `qemu-img check` must pass
//! and `qemu-img compare` must find each image equal to a reference built here.
//!
//! `control_resize_notifies_the_front_end`, without a guest: the vhost crate's front-end
//! negotiates the back-end request channel, a resize on the control socket must send
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on it and GET_CONFIG must then report the new
//! capacity.
//!
//! Also runs `engine/examples/virtio_blk_loop.rs`.

mod common;

use common::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
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

/// Starts `quring serve --vhost-user-blk SOCK ARGS... IMG` with its output in `log` and
/// waits for the socket.
fn start_server(img: &Path, sock: &Path, log: &Path, args: &[&str]) -> Child {
    let mut server = Command::new(quring_bin())
        .args(["serve", "--vhost-user-blk", &s(sock)])
        .args(args)
        .arg(img)
        .stdin(Stdio::null())
        .stdout(File::create(log).unwrap())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("spawn quring serve");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(st) = server.try_wait().unwrap() {
            panic!("quring serve exited early ({st}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket from quring serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// QEMU's command line for the guest: one vhost-user-blk device per socket (`queues`
/// virtqueues each), `append` added to the kernel command line.
fn qemu_cmd(socks: &[&Path], queues: u32, append: &str) -> Command {
    let g = guest();
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-machine", "q35", "-smp", &queues.max(1).to_string(), "-m", "512"]);
    c.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"]);
    for (i, sock) in socks.iter().enumerate() {
        c.args(["-chardev", &format!("socket,id=c{i},path={}", s(sock))]);
        c.args(["-device", &format!("vhost-user-blk-pci,chardev=c{i},num-queues={queues}")]);
    }
    c.args(["-kernel", &s(&g.join("vmlinuz")), "-initrd", &s(&g.join("initrd.gz"))]);
    c.args(["-append", &format!("console=ttyS0 quiet panic=-1 {append}")]);
    c.args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"]);
    c
}

fn guest_case(name: &str, create_opts: &str, queues: u32) {
    let g = guest();
    let _one = serial();
    let dir = tempdir();
    let img = dir.path().join(format!("{name}.qcow2"));
    let sock = dir.path().join("vhost.sock");
    qemu_img(["create", "-q", "-f", "qcow2", "-o", create_opts, &s(&img), &DISK.to_string()]).ok();

    let log = dir.path().join("serve.log");
    // The init's discard must free its clusters (the reference reads zeros there).
    let mut server = start_server(&img, &sock, &log, &["--queues", &queues.to_string(), "--discard=unmap"]);

    let boot = Instant::now();
    let q = run_with_timeout(&mut qemu_cmd(&[sock.as_path()], queues, ""), GUEST_TIMEOUT);
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

/// A guest byte range `[start, end)`.
type Range = (u64, u64);

/// One control command on `quring serve --control PATH`, and its reply line.
fn control(path: &Path, cmd: &str) -> String {
    let mut c = std::os::unix::net::UnixStream::connect(path).expect("connect to the control socket");
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(c, "{cmd}").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).expect("control reply");
    line.trim().to_string()
}

/// `qemu-img map --output=json` of `img` as (start, end, zero, data) extents.
fn map_extents(img: &Path) -> Vec<(u64, u64, bool, bool)> {
    let m = qemu_img(["map", "--output=json", &s(img)]).ok().json();
    m.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap(), e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap())
        })
        .collect()
}

/// The guest's discard case on one image: the ranges the guest leaves reading as zeros
/// (per the image's granularity: `sub` is the subcluster size with extended L2), and the
/// ranges that keep their data, over the first 4 MiB (see scripts/build-guest.sh one_disk).
fn discard_ranges(sub: Option<u64>) -> (Vec<Range>, Vec<Range>) {
    let mut zero = vec![
        (256 * KIB, 512 * KIB),                     // blkdiscard of whole clusters
        (2 * MIB + 64 * KIB, 2 * MIB + 192 * KIB),  // fallocate --punch-hole (WRITE_ZEROES + UNMAP)
        (3 * MIB + 64 * KIB, 3 * MIB + 192 * KIB),  // fallocate --zero-range (WRITE_ZEROES)
        (3 * MIB + 256 * KIB, 3 * MIB + 320 * KIB), // a write of zeros (--detect-zeroes=unmap)
    ];
    let mut data = vec![
        (0, 256 * KIB),
        (512 * KIB, MIB),
        (MIB + 192 * KIB, 2 * MIB),
        (2 * MIB + 192 * KIB, 3 * MIB),
        (3 * MIB + 320 * KIB, 3 * MIB + 512 * KIB),
        (3 * MIB + 576 * KIB, 4 * MIB),
    ];
    // blkdiscard of [1M+4K, 1M+132K): whole clusters only, or whole subclusters too.
    match sub {
        None => {
            zero.push((MIB + 64 * KIB, MIB + 128 * KIB));
            data.extend([(MIB, MIB + 64 * KIB), (MIB + 128 * KIB, MIB + 192 * KIB)]);
        }
        Some(_) => {
            zero.push((MIB + 4 * KIB, MIB + 132 * KIB));
            data.extend([(MIB, MIB + 4 * KIB), (MIB + 132 * KIB, MIB + 192 * KIB)]);
        }
    }
    // fallocate --zero-range of [3M+513K, 3M+516K): zeros written as data in a standard
    // cluster; with 2 KiB subclusters [3M+514K, 3M+516K) becomes a zero subcluster.
    if let Some(s) = sub {
        zero.push((3 * MIB + 514 * KIB, 3 * MIB + 514 * KIB + s));
    }
    (zero, data)
}

/// The reference content of a disk after the discard case and the resize to `size`.
fn discard_reference(pattern: &[u8], size: u64, sub: Option<u64>) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for i in 0..4 {
        d[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(pattern);
    }
    let (zero, _) = discard_ranges(sub);
    for (a, b) in zero {
        d[a as usize..b as usize].fill(0);
    }
    let small = (3 * MIB + 513 * KIB) as usize;
    d[small..small + 3 * KIB as usize].fill(0);
    d[(65 * MIB) as usize..(66 * MIB) as usize].copy_from_slice(pattern);
    d
}

#[test]
fn control_resize_notifies_the_front_end() {
    use vhost::VhostBackend;
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("c.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", &s(&img), "64M"]).ok();
    let (sock, ctl, log) = (d.join("c.sock"), d.join("c.ctl"), d.join("c.log"));
    let mut server = start_server(&img, &sock, &log, &["--discard=unmap", "--control", &s(&ctl)]);
    let mut fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let version_1 = 1u64 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
    fe.set_features(features & (version_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ;
    assert!(offered.contains(want), "protocol features offered: {offered:?}");
    fe.set_protocol_features(want).unwrap();
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let config = |fe: &mut Frontend| fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60]).unwrap().1;
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let c = config(&mut fe);
    assert_eq!(le64(&c[0..]), DISK / 512, "capacity");
    assert_eq!(le32(&c[44..]), 4, "discard_sector_alignment: 2 KiB subclusters");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap with --discard=unmap");

    assert_eq!(control(&ctl, "resize +1M"), format!("OK {}", DISK + MIB));
    ours.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hdr = [0u8; 12];
    ours.read_exact(&mut hdr).expect("VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    // request 2 (CONFIG_CHANGE_MSG), flags 1 (version 1), no payload.
    assert_eq!(hdr, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(le64(&config(&mut fe)[0..]), (DISK + MIB) / 512, "capacity after the resize");
    assert_eq!(control(&ctl, "size"), format!("OK {}", DISK + MIB));
    assert!(control(&ctl, "grow 1M").starts_with("ERROR unknown command"));

    drop(fe);
    let st = wait_child(&mut server, Duration::from_secs(30));
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success() && l.contains("image closed"), "quring serve: {st}\n{l}");
    assert!(!ctl.exists(), "the control socket is removed at exit");
    let c = qemu_img(["check", &s(&img)]);
    assert_eq!(c.status(), 0, "qemu-img check: {}", c.describe());
    let info = qemu_img(["info", "--output=json", &s(&img)]).ok().json();
    assert_eq!(info["virtual-size"].as_u64(), Some(DISK + MIB));
}

#[test]
fn guest_discard_and_resize() {
    const GROWN: u64 = DISK + 16 * MIB;
    let g = guest();
    let _one = serial();
    let dir = tempdir();
    let d = dir.path();
    // (name, create options, subcluster size)
    let kinds = [("std", "cluster_size=65536", None), ("ext", "extended_l2=on,cluster_size=65536", Some(2 * KIB))];
    let mut servers = Vec::new();
    for (name, opts, _) in kinds {
        let img = d.join(format!("{name}.qcow2"));
        qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, &s(&img), &DISK.to_string()]).ok();
        let (sock, ctl, log) =
            (d.join(format!("{name}.sock")), d.join(format!("{name}.ctl")), d.join(format!("{name}.log")));
        let args = ["--discard=unmap", "--detect-zeroes=unmap", "--control", &s(&ctl)];
        let child = start_server(&img, &sock, &log, &args);
        servers.push((name, img, sock, ctl, log, child));
    }
    // Before any front-end: the control socket answers, and a bad size changes nothing.
    assert_eq!(control(&servers[0].3, "size"), format!("OK {DISK}"));
    assert!(control(&servers[0].3, "resize 1000").starts_with("ERROR"), "a size not a multiple of 512");
    assert!(control(&servers[0].3, "resize 1M").starts_with("ERROR"), "a shrink without --shrink");

    let socks: Vec<&Path> = servers.iter().map(|x| x.2.as_path()).collect();
    let mut qemu = qemu_cmd(&socks, 1, "quring.case=discard");
    let qlog = d.join("qemu.err");
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&qlog).unwrap())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let boot = Instant::now();
    let mut console = String::new();
    let mut replies = Vec::new();
    loop {
        let left = GUEST_TIMEOUT.saturating_sub(boot.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                console.push_str(&line);
                console.push('\n');
                if line.contains("QURING-RESIZE-READY") {
                    for x in &servers {
                        replies.push(control(&x.3, &format!("resize {GROWN}")));
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let qst = wait_child(&mut child, Duration::from_secs(30));
    let _ = reader.join();
    let guest_secs = boot.elapsed().as_secs_f64();
    let mut logs = String::new();
    for x in servers.iter_mut() {
        let st = wait_child(&mut x.5, Duration::from_secs(30));
        let l = std::fs::read_to_string(&x.4).unwrap_or_default();
        assert!(st.success(), "[{}] quring serve: {st}\n{l}", x.0);
        assert!(l.contains("image closed"), "[{}] no clean close:\n{l}", x.0);
        logs.push_str(&format!("[{}]\n{l}", x.0));
    }
    let qerr = std::fs::read_to_string(&qlog).unwrap_or_default();
    eprintln!("[discard] guest ran {guest_secs:.1}s ({qst})\n{console}\n{qerr}\n{logs}");
    assert!(console.contains("QURING-DONE"), "guest did not finish:\n{console}\n{qerr}\n{logs}");
    assert!(!console.contains("QURING-FAIL"), "guest step failed:\n{console}\n{logs}");
    for r in &replies {
        assert_eq!(r, &format!("OK {GROWN}"), "resize reply (the front-end must be told)");
    }

    let mut pattern = Vec::new();
    File::open(g.join("pattern.bin")).unwrap().read_to_end(&mut pattern).unwrap();
    let want_tail = {
        let p = d.join("pattern.copy");
        std::fs::write(&p, &pattern).unwrap();
        md5sum(&p)
    };
    for n in ["vda", "vdb"] {
        assert!(
            console.contains(&format!("QURING-NEWSIZE {n} {}", GROWN / 512)),
            "{n} size after the resize:\n{console}"
        );
        assert!(console.contains(&format!("QURING-TAILSUM {n} {want_tail}")), "{n} past the old end:\n{console}");
    }
    for (x, (_, _, sub)) in servers.iter().zip(kinds) {
        let (name, img) = (x.0, &x.1);
        let gran = sub.unwrap_or(64 * KIB);
        let reference = discard_reference(&pattern, GROWN, sub);
        let raw = d.join(format!("{name}.raw"));
        std::fs::write(&raw, &reference).unwrap();
        let head = d.join(format!("{name}.head"));
        std::fs::write(&head, &reference[..(4 * MIB) as usize]).unwrap();
        let sum = md5sum(&head);
        assert!(
            console.contains(&format!(" {gran} {sum}")),
            "[{name}] guest checksum of the first 4 MiB ({gran}, {sum}):\n{console}"
        );

        let c = qemu_img(["check", &s(img)]);
        assert_eq!(c.status(), 0, "[{name}] qemu-img check: {}", c.describe());
        let info = qemu_img(["info", "--output=json", &s(img)]).ok().json();
        assert_eq!(info["virtual-size"].as_u64(), Some(GROWN), "[{name}] size");
        let c = qemu_img(["compare", "-f", "raw", "-F", "qcow2", &s(&raw), &s(img)]);
        assert_eq!(c.status(), 0, "[{name}] qemu-img compare: {}", c.describe());

        let map = map_extents(img);
        let (zero, data) = discard_ranges(sub);
        let overlapping = |a: u64, b: u64| map.iter().filter(move |e| e.0 < b && e.1 > a);
        for (a, b) in zero {
            for e in overlapping(a, b) {
                assert!(e.2 && !e.3, "[{name}] [{a}, {b}) should read as zeros without data: {e:?}\n{map:?}");
            }
        }
        for (a, b) in data {
            for e in overlapping(a, b) {
                assert!(e.3 && !e.2, "[{name}] [{a}, {b}) should keep its data: {e:?}\n{map:?}");
            }
        }
    }
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
