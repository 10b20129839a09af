//! criterion benches of the hot code: L2 entry decode/classify, refcount packing at every
//! width, the metadata cache's hit path from one and two threads, and the allocator (a
//! first-touch write through a queue: batch reservation, zero-fill skip, L2 publication).

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use quring::format::Geometry;
use quring::format::l2::{self, L2Entry, SubclusterBitmap};
use quring::format::refcount;
use quring::meta::cache::{Claim, MetaCache};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn l2_decode(c: &mut Criterion) {
    let std = Geometry::new(16, false, 4).unwrap();
    let ext = Geometry::new(16, true, 4).unwrap();
    let entries: Vec<u64> = (0..4096u64).map(|i| 0x8000_0000_0000_0000 | ((i + 5) << 16)).collect();
    let mut g = c.benchmark_group("l2");
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("decode standard", |b| {
        b.iter(|| {
            for &e in &entries {
                black_box(L2Entry(black_box(e)).decode(&std).unwrap());
            }
        })
    });
    g.bench_function("classify extended", |b| {
        let bm = SubclusterBitmap::from_parts(0x0f0f_0f0f, 0xf0f0_f0f0);
        b.iter(|| {
            for &e in &entries {
                black_box(l2::classify(&ext, L2Entry(e), bm, black_box(4096), 4096).unwrap());
            }
        })
    });
    g.finish();
}

fn refcounts(c: &mut Criterion) {
    let mut g = c.benchmark_group("refcount");
    g.throughput(Throughput::Elements(1024));
    for order in 0..=6u32 {
        let mut block = vec![0u8; 65536];
        g.bench_function(format!("set+get {}-bit", 1 << order), |b| {
            b.iter(|| {
                for i in 0..1024u64 {
                    refcount::set(&mut block, i, order, 1);
                    black_box(refcount::get(&block, black_box(i), order));
                }
            })
        });
    }
    g.finish();
}

fn filled_cache() -> Arc<MetaCache> {
    let c = Arc::new(MetaCache::new(4 << 20, 4096));
    for k in 0..256u64 {
        let key = (k + 1) << 16;
        if let Claim::Load(s) = c.claim(key) {
            let p = c.slot_ptr(s) as *mut u64;
            for w in 0..512 {
                // SAFETY: we own the slot in loading state; 512 words fit in 4 KiB.
                unsafe { p.add(w).write((key + w as u64).to_be()) };
            }
            c.complete_load(s);
        }
    }
    c
}

fn cache_hits(c: &mut Criterion) {
    let cache = filled_cache();
    let mut g = c.benchmark_group("cache hit");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("1 thread", |b| {
        b.iter(|| {
            for i in 0..1024u64 {
                let key = ((i * 7 % 256) + 1) << 16;
                black_box(cache.read_word(key, (i % 512) as usize).unwrap());
            }
        })
    });
    // Two threads: this one measures while a second hammers the same cache with hits.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let cache = cache.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = ((i * 13 % 256) + 1) << 16;
                black_box(cache.read_word(key, (i % 512) as usize));
                i += 1;
            }
        })
    };
    g.bench_function("2 threads (per thread)", |b| {
        b.iter(|| {
            for i in 0..1024u64 {
                let key = ((i * 7 % 256) + 1) << 16;
                black_box(cache.read_word(key, (i % 512) as usize).unwrap());
            }
        })
    });
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    g.finish();
}

/// The allocation path: every iteration is a 4 KiB write into a cluster never written
/// before, so it takes a host cluster from the queue's batch (refilling the batch under the
/// metadata lock every 64 clusters) and publishes a new L2 entry. The image lives on
/// /dev/shm so the device costs as little as possible; its data writes are still real I/O.
fn allocator(c: &mut Criterion) {
    use quring::image::{Image, Options};
    use quring::queue::{Queue, QueueOptions};
    let dir = tempfile::Builder::new().prefix("quring-alloc-bench.").tempdir_in("/dev/shm").expect("tempdir");
    let path = dir.path().join("a.qcow2");
    let o = quring::format::layout::CreateOptions { size: 1 << 40, ..Default::default() };
    quring::image::create(&path, &o, true).expect("create");
    let img = Image::open(&path, &Options::default()).expect("open");
    let mut q = Queue::new(&img, &QueueOptions::default()).expect("queue");
    let mut buf = quring::io::AlignedBuf::new(4096);
    buf.fill(0x5a);
    let cluster = 65536u64;
    let mut next = 0u64;
    let mut g = c.benchmark_group("allocator");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.bench_function("first-touch 4k write (64 KiB clusters)", |b| {
        b.iter(|| {
            q.write_at(&buf, next).expect("write");
            next = (next + cluster) % (1 << 40);
        })
    });
    g.finish();
    drop(q);
    img.close().expect("close");
}

criterion_group!(benches, l2_decode, refcounts, cache_hits, allocator);
criterion_main!(benches);
