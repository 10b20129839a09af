//! A failed final flush or close is never only a message (issue 12, section 5): `quring io`,
//! `bench`, `convert`, `serve` and the fio plugin exit non-zero when the metadata they
//! write back at the end cannot be written or made durable.
//!
//! The failures are injected with `QURING_INJECT_ERROR` (`engine/src/io/hook.rs`):
//! `flush:EIO` fails every device flush of the images a program opens, `metadata:EIO` also
//! every write of their L2 tables, refcount blocks, L1 table and header. Guest data writes
//! go through, so in writeback mode a write into an existing L2 table completes and only the
//! final flush or close, which writes the new L2 entry and refcounts back, fails. Every case
//! also runs without injection and must then exit 0, so the failure seen is the injected
//! one.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const INJECT: &str = "QURING_INJECT_ERROR";

/// A 16 MiB image whose first 512 MiB already have an L2 table (one cluster written), so
/// that writes elsewhere in it allocate data clusters only.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    build_qcow2(&p, &Qcow2Opts::default(), 16 * MIB, &["write -P 0x11 0 64k".into()]);
    p
}

fn quring_env(args: &[&str], inject: Option<&str>) -> Run {
    let mut c = Command::new(quring_bin());
    c.args(args).env("LC_ALL", "C").env_remove(INJECT);
    if let Some(v) = inject {
        c.env(INJECT, v);
    }
    run(&mut c)
}

/// Exit 1 (a failure, no panic, no signal) with `needle` on stderr.
#[track_caller]
fn assert_failed(r: &Run, needle: &str) {
    assert_eq!(r.code, Some(1), "expected exit 1:\n{}", r.describe());
    assert!(!r.stderr.contains("panicked"), "panic:\n{}", r.describe());
    assert!(r.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", r.describe());
}

#[test]
fn io_exits_1_when_the_close_fails() {
    for inject in ["flush:EIO", "metadata:EIO", "metadata:ENOSPC"] {
        let d = tempdir();
        let p = image(d.path(), "x.qcow2");
        // The write itself completes (its report is printed); the close then fails.
        let r = quring_env(&["io", "-c", "write -P 0x22 1M 64k", &s(&p)], Some(inject));
        assert_failed(&r, &format!("quring: closing '{}' failed", p.display()));
        assert!(r.stdout.contains("wrote 65536/65536 bytes at offset 1048576"), "[{inject}] {}", r.describe());
        let errno = if inject.ends_with("ENOSPC") { "No space left on device" } else { "Input/output error" };
        assert!(r.stderr.contains(errno), "[{inject}] {}", r.describe());
    }
    let d = tempdir();
    let p = image(d.path(), "x.qcow2");
    quring_env(&["io", "-c", "write -P 0x22 1M 64k", &s(&p)], None).ok();
    // A read-only session writes nothing back: nothing to fail.
    quring_env(&["io", "-c", "read -P 0x22 1M 64k", &s(&p)], Some("metadata:EIO")).ok();
}

#[test]
fn io_exits_1_when_the_flush_command_fails() {
    let d = tempdir();
    let p = image(d.path(), "x.qcow2");
    let r = quring_env(&["io", "-c", "write -P 0x22 1M 64k", "-c", "flush", &s(&p)], Some("flush:EIO"));
    assert_failed(&r, "flush failed");
}

#[test]
fn bench_exits_non_zero_when_the_final_flush_fails() {
    let d = tempdir();
    let p = image(d.path(), "x.qcow2");
    let args = ["bench", "-q", "-w", "-c", "64", "-d", "8", "-s", "64k", "-S", "128k", "-o", "1M", &s(&p)];
    let r = quring_env(&args, Some("flush:EIO"));
    assert_failed(&r, "Input/output error");
    quring_env(&args, None).ok();
}

#[test]
fn convert_exits_1_when_the_output_cannot_be_flushed() {
    let d = tempdir();
    let src = image(d.path(), "src.qcow2");
    let out = d.path().join("out.qcow2");
    let r = quring_env(&["convert", "-O", "qcow2", &s(&src), &s(&out)], Some("flush:EIO"));
    assert_failed(&r, "Input/output error");
    std::fs::remove_file(&out).unwrap();
    quring_env(&["convert", "-O", "qcow2", &s(&src), &s(&out)], None).ok();
    qemu_img(["compare", "-q", &s(&src), &s(&out)]).ok();
}

fn fio(img: &Path, inject: Option<&str>) -> Run {
    let mut c = Command::new("fio");
    c.arg("--name=close")
        .arg(format!("--ioengine=external:{}", fio_plugin().display()))
        .args(["--thread", "--rw=randwrite", "--bs=4k", "--size=16M", "--io_size=1M", "--randseed=7"])
        .arg(format!("--filename={}", s(img)))
        .env("LC_ALL", "C")
        .env_remove(INJECT);
    if let Some(v) = inject {
        c.env(INJECT, v);
    }
    run(&mut c)
}

#[test]
fn fio_plugin_fails_the_job_when_the_close_fails() {
    for inject in ["flush:EIO", "metadata:EIO"] {
        let d = tempdir();
        let p = image(d.path(), "x.qcow2");
        let r = fio(&p, Some(inject));
        // Every write completed; the close at job end failed, and so does the job.
        assert_ne!(r.code, Some(0), "[{inject}] fio exited 0:\n{}", r.describe());
        assert_eq!(r.signal, None, "[{inject}] fio died on a signal:\n{}", r.describe());
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(all.contains("quring: closing"), "[{inject}] no close error:\n{}", r.describe());
        assert!(
            all.contains("func=file close, error=Input/output error"),
            "[{inject}] job not failed:\n{}",
            r.describe()
        );
        assert!(!all.contains("func=io_u error"), "[{inject}] a write failed, not the close:\n{}", r.describe());
    }
    let d = tempdir();
    let p = image(d.path(), "x.qcow2");
    let r = fio(&p, None);
    assert!(r.success(), "fio without injection:\n{}", r.describe());
}

/// A vhost-user-blk front-end just big enough for one virtio-blk write: one 8-entry split
/// virtqueue in a shared memfd, no protocol features (the ring is enabled by SET_FEATURES).
mod frontend {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;
    use std::time::{Duration, Instant};
    use vhost::vhost_user::Frontend;
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::EventFd;

    const MEM: usize = 1 << 20;
    const QSIZE: u16 = 8;
    const DESC: usize = 0;
    const AVAIL: usize = 0x1000;
    const USED: usize = 0x2000;
    const HEADER: usize = 0x3000;
    const DATA: usize = 0x4000;
    const STATUS: usize = 0x8000;

    pub struct Guest {
        fe: Frontend,
        mem: *mut u8,
        _fd: OwnedFd,
        kick: EventFd,
        _call: EventFd,
    }

    impl Guest {
        /// Connects to `sock` (retrying while the server starts) and sets up queue 0.
        pub fn connect(sock: &Path) -> Guest {
            let start = Instant::now();
            let fe = loop {
                match Frontend::connect(sock, 1) {
                    Ok(f) => break f,
                    Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("connect {}: {e}", sock.display()),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            // SAFETY: memfd_create with a valid name; the result is checked.
            let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: raw is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: ftruncate on our own memfd.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MEM as i64) }, 0);
            // SAFETY: a shared mapping of the whole memfd, checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MEM,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            let mem = p as *mut u8;
            let (kick, call) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
            fe.set_owner().unwrap();
            let features = fe.get_features().unwrap();
            fe.set_features(features & (1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1)).unwrap();
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM as u64,
                userspace_addr: mem as u64,
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
            };
            fe.set_mem_table(&[region]).unwrap();
            fe.set_vring_num(0, QSIZE).unwrap();
            let ua = |off: usize| mem as u64 + off as u64;
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: ua(DESC),
                used_ring_addr: ua(USED),
                avail_ring_addr: ua(AVAIL),
                log_addr: None,
            };
            fe.set_vring_addr(0, &cfg).unwrap();
            fe.set_vring_base(0, 0).unwrap();
            fe.set_vring_call(0, &call).unwrap();
            fe.set_vring_kick(0, &kick).unwrap();
            Guest { fe, mem, _fd: fd, kick, _call: call }
        }

        fn put<T: Copy>(&self, off: usize, v: T) {
            // SAFETY: off + size_of::<T>() lies inside the MEM-byte mapping (the constants
            // above); unaligned writes are allowed.
            unsafe { std::ptr::write_volatile(self.mem.add(off).cast::<T>(), v) }
        }

        fn get<T: Copy>(&self, off: usize) -> T {
            // SAFETY: as in put.
            unsafe { std::ptr::read_volatile(self.mem.add(off).cast::<T>()) }
        }

        /// Writes `len` bytes of `byte` at disk sector `sector` and waits for the status.
        pub fn write(&self, sector: u64, byte: u8, len: u32) -> u8 {
            const NEXT: u16 = 1;
            const WRITE: u16 = 2;
            // virtio_blk_outhdr: type (1 = OUT), reserved, sector.
            self.put(HEADER, 1u32);
            self.put(HEADER + 4, 0u32);
            self.put(HEADER + 8, sector);
            for i in 0..len as usize {
                self.put(DATA + i, byte);
            }
            self.put(STATUS, 0xffu8);
            // Descriptors: addr u64, len u32, flags u16, next u16.
            for (i, (addr, l, flags, next)) in
                [(HEADER, 16, NEXT, 1u16), (DATA, len, NEXT, 2), (STATUS, 1, WRITE, 0)].into_iter().enumerate()
            {
                let d = DESC + i * 16;
                self.put(d, addr as u64);
                self.put(d + 8, l);
                self.put(d + 12, flags);
                self.put(d + 14, next);
            }
            // Avail ring: flags, idx, ring[0] = head 0.
            self.put(AVAIL + 4, 0u16);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.put(AVAIL + 2, 1u16);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.kick.write(1).unwrap();
            let start = Instant::now();
            while self.get::<u16>(USED + 2) != 1 {
                assert!(start.elapsed() < Duration::from_secs(20), "the write never completed");
                std::thread::sleep(Duration::from_millis(2));
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.get(STATUS)
        }

        /// Disconnects (the server then closes the image and exits).
        pub fn disconnect(self) {
            drop(self.fe);
            // SAFETY: the mapping made in connect, unmapped once.
            unsafe { libc::munmap(self.mem.cast(), MEM) };
        }
    }
}

/// `quring serve` on a fresh image: one 4 KiB write from a front-end, a disconnect, and
/// the server's exit status and stderr.
fn serve_one_write(inject: Option<&str>) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let d = tempdir();
    let p = image(d.path(), "x.qcow2");
    let sock = d.path().join("blk.sock");
    let log = d.path().join("serve.log");
    let mut c = Command::new(quring_bin());
    c.args(["serve", "--vhost-user-blk", &s(&sock), &s(&p)])
        .env("LC_ALL", "C")
        .env_remove(INJECT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(v) = inject {
        c.env(INJECT, v);
    }
    let mut server = c.spawn().expect("spawn quring serve");
    let start = Instant::now();
    while !sock.exists() {
        if let Some(st) = server.try_wait().unwrap() {
            panic!("quring serve exited early ({st}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket from quring serve");
        std::thread::sleep(Duration::from_millis(10));
    }
    let guest = frontend::Guest::connect(&sock);
    assert_eq!(guest.write(2048, 0x33, 4096), 0, "the guest write failed");
    guest.disconnect();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = server.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = server.kill();
            panic!("quring serve did not exit after the disconnect");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap(), p, d)
}

#[test]
fn serve_exits_1_when_the_close_fails() {
    let (code, log, _, _d) = serve_one_write(Some("flush:EIO"));
    assert_eq!(code, Some(1), "quring serve:\n{log}");
    assert!(log.contains("Input/output error"), "{log}");
    assert!(!log.contains("image closed"), "{log}");
    let (code, log, p, _d) = serve_one_write(None);
    assert_eq!(code, Some(0), "quring serve without injection:\n{log}");
    assert!(log.contains("image closed"), "{log}");
    // The write reached the image (at 1 MiB = sector 2048).
    qemu_io(["-c", "read -P 0x33 1M 4k", &s(&p)]).ok();
}
