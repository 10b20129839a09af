//! `quring bench`: qemu-img bench's options and access pattern on the quring engine, plus
//! `--random --seed N`, printing IOPS and latency percentiles (hdrhistogram).

use crate::util::parse_size;
use clap::Parser;
use hdrhistogram::Histogram;
use quring::image::{Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `quring bench` (qemu-img bench compatible).
#[derive(Parser)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    /// Request size.
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Offset step between requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Start offset.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Byte pattern for writes.
    #[arg(long = "pattern", default_value_t = 0)]
    pattern: u8,
    /// Cache mode (accepted: none, writeback, writethrough, directsync).
    #[arg(short = 't', default_value = "none")]
    cache: String,
    /// AIO mode (accepted for compatibility; quring always uses io_uring).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Image format (qcow2; raw is probed but not served by the engine).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Random offsets (aligned to the request size) instead of the step pattern.
    #[arg(long)]
    random: bool,
    /// Seed for --random.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Suppress the header line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Print the engine counters at the end.
    #[arg(long)]
    counters: bool,
    /// L2 cache size in bytes (QEMU's l2-cache-size; k/M suffixes).
    #[arg(long = "l2-cache-size")]
    l2_cache_size: Option<String>,
    /// The image.
    image: PathBuf,
}

/// Deepest queue: `2 * depth` rounded up to a power of two ring entries, whose completion
/// ring (4 times as large) must stay within io_uring's 65536.
const MAX_DEPTH: usize = 8192;

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    // qemu-img bench's bounds and messages.
    if a.count == 0 || a.count > i32::MAX as u64 {
        return Err("Invalid request count specified. Must be between 1 and 2147483647.".into());
    }
    let bufsize = parse_size(&a.size)?;
    if bufsize == 0 || bufsize > i32::MAX as u64 {
        return Err("Invalid buffer size specified. Must be between 1 and 2147483647.".into());
    }
    // -S 0 (like no -S) steps by the request size, as qemu-img does.
    let step = match &a.step {
        Some(s) => Some(parse_size(s)?).filter(|&v| v != 0).unwrap_or(bufsize),
        None => bufsize,
    };
    let start = parse_size(&a.offset)?;
    let cache = match a.cache.as_str() {
        "none" | "writeback" | "directsync" | "unsafe" => quring::image::CacheMode::Writeback,
        "writethrough" => quring::image::CacheMode::Writethrough,
        c => return Err(format!("Invalid cache mode '{c}'").into()),
    };
    let cache = if a.cache == "directsync" { quring::image::CacheMode::Writethrough } else { cache };
    let l2_cache_size = a.l2_cache_size.as_deref().map(parse_size).transpose()?;
    let opts =
        Options { read_only: !a.write, cache, l2_cache_size, hook: quring::io::hook::from_env(), ..Options::default() };
    if crate::probe::resolve(&a.image, a.format.as_deref(), a.write)? == crate::probe::ImageFormat::Raw {
        return Err(format!(
            "Could not open '{}': quring bench serves qcow2 images only (the file is raw)",
            a.image.display()
        )
        .into());
    }
    let img = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{}': {e}", a.image.display()))?;
    let size = img.size();
    if bufsize == 0 || bufsize > size || bufsize % 512 != 0 {
        return Err(
            format!("request size {bufsize} must be a non-zero multiple of 512 no larger than the image").into()
        );
    }
    // Depth and size are bounded before a buffer exists: one buffer per request in flight,
    // a ring with room for all of them (io_uring's limit), and memory for all the buffers.
    if a.depth == 0 {
        return Err("Invalid queue depth specified. Must be between 1 and 2147483647.".into());
    }
    if a.depth > MAX_DEPTH {
        return Err(format!("Invalid queue depth specified. Must be between 1 and {MAX_DEPTH}.").into());
    }
    let buffers = (a.depth as u64).saturating_mul(bufsize.next_multiple_of(4096));
    if let Some(mem) = quring::io::buf::physical_memory()
        && buffers > mem
    {
        return Err(format!(
            "{} requests of {bufsize} bytes in flight need {buffers} bytes of buffers, more than this \
             machine's memory ({mem} bytes): lower -d or -s",
            a.depth
        )
        .into());
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {start}, step size {step})",
            a.count,
            if a.write { "write" } else { "read" },
            bufsize,
            a.depth
        );
    }
    let depth = a.depth;
    let mut q = Queue::new(
        &img,
        &QueueOptions { ring_entries: (depth as u32 * 2).next_power_of_two().max(64), ..Default::default() },
    )?;
    let mut bufs: Vec<AlignedBuf> = Vec::with_capacity(depth);
    for _ in 0..depth {
        let mut b = AlignedBuf::try_new(bufsize as usize).ok_or("Cannot allocate memory for the request buffers")?;
        b.fill(a.pattern);
        bufs.push(b);
    }
    let mut started = vec![Instant::now(); depth];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut offset = start;
    let slots = size / bufsize;
    let mut next_off = |rng: &mut rand::rngs::StdRng| -> u64 {
        if a.random {
            return rng.gen_range(0..slots) * bufsize;
        }
        let o = offset;
        offset += step;
        if size <= bufsize {
            offset = 0;
        } else {
            offset %= size - bufsize;
        }
        o
    };
    let mut issued = 0u64;
    let mut completed = 0u64;
    let mut free: Vec<usize> = (0..depth).collect();
    let mut done: Vec<Completion> = Vec::with_capacity(depth);
    let t0 = Instant::now();
    while completed < a.count {
        while issued < a.count {
            let Some(slot) = free.pop() else { break };
            let off = next_off(&mut rng);
            let op = if a.write {
                Op::Write { offset: off, buf: bufs[slot].as_ptr(), len: bufsize as usize }
            } else {
                Op::Read { offset: off, buf: bufs[slot].as_mut_ptr(), len: bufsize as usize }
            };
            started[slot] = Instant::now();
            // SAFETY: bufs[slot] is not touched again until its completion is reaped.
            unsafe { q.submit(Request { op, user_data: slot as u64 })? };
            issued += 1;
        }
        q.commit()?;
        done.clear();
        q.reap(&mut done, 1, None)?;
        let now = Instant::now();
        for c in &done {
            if c.result != 0 {
                let e = q
                    .error_detail(c.user_data)
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| std::io::Error::from_raw_os_error(-c.result).to_string());
                return Err(format!("request failed: {e}").into());
            }
            let slot = c.user_data as usize;
            let _ = hist.record((now - started[slot]).as_nanos().max(1) as u64);
            free.push(slot);
            completed += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if a.write {
        q.flush()?;
    }
    println!("Run completed in {secs:.3} seconds.");
    println!(
        "IOPS: {:.0}  latency p50: {:.1} us  p99: {:.1} us  p99.9: {:.1} us",
        a.count as f64 / secs,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0
    );
    if a.counters {
        print!("{}", img.counters());
    }
    drop(q);
    img.close().map_err(|e| format!("closing '{}' failed: {e}", a.image.display()))?;
    Ok(0)
}
