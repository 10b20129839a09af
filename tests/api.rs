//! The library API as a VMM uses it: scatter-gather requests, polling completions without
//! blocking, the ring fd, counters, clean close.

mod common;

use common::*;
use quring::image::{Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::time::Duration;

#[test]
fn vectored_requests_and_polling() {
    let dir = tempdir();
    let path = dir.path().join("v.qcow2");
    let r = quring(["create", "-q", "-o", "cluster_size=64k,extended_l2=on", &s(&path), "16M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let img = Image::open(&path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    // Three segments of different sizes, one of them not page aligned in memory.
    let mut a = AlignedBuf::new(4096);
    let mut b = vec![0u8; 1024 + 512];
    let mut c = AlignedBuf::new(8192);
    a.fill(0x11);
    c.fill(0x33);
    let bseg = &mut b[512..];
    bseg.fill(0x22);
    let iov = [
        libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: a.len() },
        libc::iovec { iov_base: bseg.as_mut_ptr().cast(), iov_len: bseg.len() },
        libc::iovec { iov_base: c.as_mut_ptr().cast(), iov_len: c.len() },
    ];
    // SAFETY: the buffers outlive the request (we reap it below).
    unsafe { q.submit(Request { op: Op::Writev { offset: 3 << 20, iov: iov.as_ptr(), iovcnt: 3 }, user_data: 7 }) }
        .unwrap();
    q.commit().unwrap();
    // Poll without blocking, as an event loop would after the ring fd became readable.
    let mut out: Vec<Completion> = Vec::new();
    let fd = q.ring_fd();
    assert!(fd >= 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while out.is_empty() {
        assert!(std::time::Instant::now() < deadline, "write never completed");
        q.reap(&mut out, 0, Some(Duration::ZERO)).unwrap();
        if out.is_empty() {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        }
    }
    assert_eq!(out[0], Completion { user_data: 7, result: 0 });
    // Read it back as one buffer and as a scatter list.
    let mut whole = AlignedBuf::new(4096 + 1024 + 8192);
    q.read_at(&mut whole, 3 << 20).unwrap();
    assert!(whole[..4096].iter().all(|&x| x == 0x11));
    assert!(whole[4096..5120].iter().all(|&x| x == 0x22));
    assert!(whole[5120..].iter().all(|&x| x == 0x33));
    let mut r1 = AlignedBuf::new(512);
    let mut r2 = AlignedBuf::new(12800);
    let riov = [
        libc::iovec { iov_base: r1.as_mut_ptr().cast(), iov_len: r1.len() },
        libc::iovec { iov_base: r2.as_mut_ptr().cast(), iov_len: r2.len() },
    ];
    // SAFETY: as above.
    unsafe { q.submit(Request { op: Op::Readv { offset: 3 << 20, iov: riov.as_ptr(), iovcnt: 2 }, user_data: 8 }) }
        .unwrap();
    out.clear();
    q.reap(&mut out, 1, None).unwrap();
    assert_eq!(out[0], Completion { user_data: 8, result: 0 });
    assert_eq!(&r1[..], &whole[..512]);
    assert_eq!(&r2[..], &whole[512..]);
    // A segment that is not a multiple of 512 is refused before anything starts.
    let bad = [libc::iovec { iov_base: r1.as_mut_ptr().cast(), iov_len: 100 }];
    // SAFETY: nothing is started for a refused request.
    let e = unsafe { q.submit(Request { op: Op::Readv { offset: 0, iov: bad.as_ptr(), iovcnt: 1 }, user_data: 9 }) };
    assert!(e.is_err());
    q.flush().unwrap();
    let c = img.counters();
    assert_eq!(c.guest_writes, 1);
    assert_eq!(c.guest_reads, 2);
    drop(q);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.status(), 0, "{}", chk.describe());
    let io = qemu_io(["-c", "read -P 0x22 3149824 1024", &s(&path)]);
    assert!(!io.stdout.contains("verification failed"), "{}", io.describe());
}

#[test]
fn resize_grows_the_disk() {
    let dir = tempdir();
    let path = dir.path().join("r.qcow2");
    let r = quring(["create", "-q", "-o", "cluster_size=4k", &s(&path), "8M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let img = Image::open(&path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(65536);
    buf.fill(0x44);
    q.write_at(&buf, 0).unwrap();
    // 8 MiB with 4 KiB clusters is 4 L1 entries (2 MiB each); 40 MiB needs 20.
    img.resize(40 << 20).unwrap();
    assert_eq!(img.size(), 40 << 20);
    buf.fill(0x55);
    q.write_at(&buf, 39 << 20).unwrap();
    assert!(img.resize(1 << 20).is_err(), "shrinking is refused");
    q.flush().unwrap();
    drop(q);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.status(), 0, "{}", chk.describe());
    let info = qemu_img(["info", "--output=json", &s(&path)]);
    assert!(info.stdout.contains("\"virtual-size\": 41943040"), "{}", info.describe());
    for (pat, off) in [("0x44", 0u64), ("0x55", 39 << 20), ("0", 20 << 20)] {
        let io = qemu_io(["-c", &format!("read -P {pat} {off} 64k"), &s(&path)]);
        assert!(!io.stdout.contains("verification failed") && io.status() == 0, "{}", io.describe());
    }
}

/// First writes into fresh clusters land inside the file: the engine grows the file ahead
/// of allocation (a hole), and a clean close cuts that hole off again, so the closed image
/// ends at its last cluster and is clean. An image left with the hole (no close, as after
/// a crash) is clean too, and its data reads back.
#[test]
fn file_grows_ahead_of_allocation_and_is_trimmed_on_close() {
    let dir = tempdir();
    let path = dir.path().join("g.qcow2");
    let r = quring(["create", "-q", &s(&path), "256M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let created = file_len(&path);
    let img = Image::open(&path, &Options::default()).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(4096);
    buf.fill(0x5c);
    for i in 0..8u64 {
        q.write_at(&buf, i * (1 << 20)).unwrap();
    }
    q.flush().unwrap();
    // 8 data clusters of 64 KiB plus an L2 table would end well below 4 MiB past the
    // original end; the file was grown by at least 4 MiB ahead.
    let grown = file_len(&path);
    assert!(grown >= created + (4 << 20), "file not grown ahead: {created} -> {grown}");
    // A copy taken now is what a crash would leave: trailing hole included.
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    drop(q);
    img.close().unwrap();
    drop(img);
    let closed = file_len(&path);
    assert!(closed < grown, "tail not trimmed: {closed} >= {grown}");
    assert_eq!(closed % 65536, 0);
    for (p, ok) in [(&path, &[0][..]), (&crashed, &[0, 3][..])] {
        // Without a close the queue's unused batch clusters stay counted: leaks only.
        let r = qemu_img(["check", &s(p)]);
        assert!(ok.contains(&r.status()), "{}", r.describe());
        let r = qemu_io(["-c", "read -P 0x5c 7M 4k", "-c", "read -P 0 7344128 60k", &s(p)]);
        assert_eq!(r.status(), 0, "{}", r.describe());
        assert!(!r.stdout.contains("Pattern verification failed"), "{}", r.describe());
    }
    // The closed file ends right after its highest cluster: qemu-img's image end offset.
    let r = qemu_img(["check", "--output=json", &s(&path)]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["image-end-offset"].as_u64(), Some(closed), "{}", r.stdout);
}

/// Counters are kept per queue, and the image's are the sum of its queues' (live or gone)
/// plus work done outside queues.
#[test]
fn counters_per_queue_and_per_image() {
    let dir = tempdir();
    let path = dir.path().join("c.qcow2");
    let r = quring(["create", "-q", &s(&path), "64M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let img = Image::open(&path, &Options::default()).unwrap();
    let mut w = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut rd = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(65536);
    buf.fill(0x42);
    for i in 0..4u64 {
        w.write_at(&buf, i << 20).unwrap();
    }
    w.flush().unwrap();
    for i in 0..4u64 {
        rd.read_at(&mut buf, i << 20).unwrap();
        rd.read_at(&mut buf, i << 20).unwrap();
    }
    let (cw, cr) = (w.counters(), rd.counters());
    assert_eq!((cw.guest_writes, cw.write_bytes, cw.guest_flushes, cw.guest_reads), (4, 4 << 16, 1, 0));
    assert_eq!((cr.guest_reads, cr.read_bytes, cr.guest_writes), (8, 8 << 16, 0));
    // The writer allocated (data clusters and an L2 table), wrote the L2 table and
    // refcounts at its flush, and issued the device flushes; the reader did none of it.
    assert!(cw.clusters_allocated >= 5, "{cw:?}");
    assert!(cw.l2_writes >= 1 && cw.refblock_writes >= 1 && cw.device_flushes >= 1, "{cw:?}");
    assert_eq!((cr.l2_writes, cr.refblock_writes, cr.device_flushes, cr.clusters_allocated), (0, 0, 0, 0));
    // Reads of 64 KiB clusters: one L2 lookup each, all hits (the writer's slice is cached).
    assert_eq!(cr.l2_hits, 8, "{cr:?}");
    let sum = img.counters();
    assert_eq!(sum.guest_reads, 8);
    assert_eq!(sum.guest_writes, 4);
    assert_eq!(sum.l2_hits, cw.l2_hits + cr.l2_hits);
    assert_eq!(sum.l2_writes, cw.l2_writes);
    // A queue that is gone still counts in the image's sum.
    drop(rd);
    assert_eq!(img.counters().guest_reads, 8);
    drop(w);
    img.close().unwrap();
    assert_eq!(img.counters().guest_writes, 4);
}

/// A queue counts the cache evictions its own slice loads cause.
#[test]
fn evictions_counted_per_queue() {
    let dir = tempdir();
    let path = dir.path().join("e.qcow2");
    // 4 GiB of 64 KiB clusters, fully mapped by preallocation: 32 L2 tables of 64 KiB.
    let r = quring(["create", "-q", "-o", "preallocation=metadata", &s(&path), "4G"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let opts = Options { l2_cache_size: Some(64 << 10), l2_cache_entry_size: Some(4096), ..Options::default() };
    let img = Image::open(&path, &opts).unwrap();
    let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
    let mut buf = AlignedBuf::new(4096);
    // 64 KiB of 4 KiB slices = 16 slots; one read per slice's coverage (512 entries x 64 KiB
    // = 32 MiB) over 4 GiB touches 128 slices, so at least 112 loads evict one.
    for i in 0..128u64 {
        q.read_at(&mut buf, i * (32 << 20)).unwrap();
    }
    let c = q.counters();
    assert_eq!(c.l2_misses, 128, "{c:?}");
    assert!(c.l2_evictions >= 128 - 16, "{c:?}");
    assert_eq!(img.counters().l2_evictions, c.l2_evictions);
}

/// Queues with a kernel SQ polling thread and the default ring both serve many requests in
/// flight, reads that take the whole-read fast path among them (aligned 4 KiB reads of
/// allocated clusters) and reads that do not (unaligned buffers, reads across clusters,
/// unallocated clusters), with the bytes written.
#[test]
fn sqpoll_and_fast_path_reads() {
    let dir = tempdir();
    let path = dir.path().join("p.qcow2");
    let r = quring(["create", "-q", "-o", "cluster_size=64k", &s(&path), "8M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let img = Image::open(&path, &Options::default()).unwrap();
    for sqpoll in [true, false] {
        let mut q = Queue::new(&img, &QueueOptions { sqpoll, ..QueueOptions::default() }).unwrap();
        // 4 MiB of data with a pattern by offset; the last 4 MiB stay unallocated.
        let mut data = AlignedBuf::new(4 << 20);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ sqpoll as u8;
        }
        q.write_at(&data, 0).unwrap();
        // 64 reads in flight: aligned 4 KiB pieces, 8 KiB straddling a cluster boundary,
        // 4 KiB into an unaligned buffer, and 4 KiB of unallocated space.
        let mut bufs: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::new(8192 + 512)).collect();
        let mut want = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            let (off, len, skip) = match i % 4 {
                0 => ((i as u64 * 37 % 1024) * 4096, 4096usize, 0usize),
                1 => ((i as u64 % 60 + 1) * 65536 - 4096, 8192, 0),
                2 => ((i as u64 * 11 % 1000) * 4096, 4096, 512),
                _ => (6 << 20, 4096, 0),
            };
            // SAFETY: skip < the buffer's length, so the pointer stays inside it.
            let ptr = unsafe { b.as_mut_ptr().add(skip) };
            // SAFETY: the buffer outlives the request (reaped below, before `bufs` drops).
            unsafe { q.submit(Request { op: Op::Read { offset: off, buf: ptr, len }, user_data: i as u64 }) }.unwrap();
            want.push((off as usize, len, skip));
        }
        q.commit().unwrap();
        let mut out: Vec<Completion> = Vec::new();
        while out.len() < 64 {
            let need = 64 - out.len();
            q.reap(&mut out, need, Some(Duration::from_secs(10))).unwrap();
        }
        assert!(out.iter().all(|c| c.result == 0), "sqpoll={sqpoll}: {out:?}");
        for (i, &(off, len, skip)) in want.iter().enumerate() {
            let got = &bufs[i][skip..skip + len];
            let exp: Vec<u8> = if off >= 4 << 20 { vec![0; len] } else { data[off..off + len].to_vec() };
            assert!(got == &exp[..], "sqpoll={sqpoll}: read {i} at {off:#x}+{len} (buffer +{skip}) differs");
        }
        assert_eq!(q.in_flight(), 0);
        assert!(q.counters().guest_reads >= 64, "{:?}", q.counters());
    }
}

/// A ring far smaller than the requests in flight: submissions fill the submission queue
/// many times over (each allocating write also issues fill reads and slice loads), and every
/// request still completes with the right data.
#[test]
fn tiny_ring_many_requests_in_flight() {
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    let r = quring(["create", "-q", "-o", "cluster_size=4k", &s(&path), "64M"]);
    assert_eq!(r.status(), 0, "{}", r.describe());
    let img = Image::open(&path, &Options { l2_cache_size: Some(16 << 10), ..Options::default() }).unwrap();
    let mut q = Queue::new(&img, &QueueOptions { ring_entries: 8, ..QueueOptions::default() }).unwrap();
    const N: usize = 256;
    let mut bufs: Vec<AlignedBuf> = (0..N)
        .map(|i| {
            let mut b = AlignedBuf::new(6144);
            b.fill(i as u8 ^ 0x5a);
            b
        })
        .collect();
    // Writes of 6 KiB at 6 KiB steps spread over the disk: every one straddles clusters.
    let off = |i: usize| (i as u64 * 6144 * 37) % ((64 << 20) - 6144) / 512 * 512;
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by_key(|&i| off(i));
    order.dedup_by_key(|i| off(*i) / 8192);
    for &i in &order {
        // SAFETY: the buffers outlive the requests (reaped below).
        unsafe {
            q.submit(Request {
                op: Op::Write { offset: off(i), buf: bufs[i].as_ptr(), len: 6144 },
                user_data: i as u64,
            })
        }
        .unwrap();
    }
    let mut out = Vec::new();
    while out.len() < order.len() {
        q.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert!(out.iter().all(|c| c.result == 0), "{out:?}");
    out.clear();
    for &i in &order {
        bufs[i].fill(0);
        // SAFETY: as above.
        unsafe {
            q.submit(Request {
                op: Op::Read { offset: off(i), buf: bufs[i].as_mut_ptr(), len: 6144 },
                user_data: i as u64,
            })
        }
        .unwrap();
    }
    while out.len() < order.len() {
        q.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert!(out.iter().all(|c| c.result == 0), "{out:?}");
    for &i in &order {
        assert!(bufs[i].iter().all(|&b| b == i as u8 ^ 0x5a), "request {i} at {} read back wrong", off(i));
    }
    drop(q);
    img.close().unwrap();
    drop(img);
    let chk = qemu_img(["check", &s(&path)]);
    assert_eq!(chk.status(), 0, "{}", chk.describe());
}
