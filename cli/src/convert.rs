//! `quring convert`: qemu-img convert's options on a raw or qcow2 source (qcow2 with its
//! backing chain), writing raw or qcow2: `-O`, `-o`, `-B backing -F fmt` (the output only
//! holds what the source's top layer has), `-n` (the target exists), `-S` (zero runs of at
//! least this size become holes or stay unallocated), `-c` (compressed clusters), `-p`,
//! `-m N`, `-W` and `--bitmaps [--skip-broken-bitmaps]` (`convert_bitmaps.rs`). The copy
//! runs on several threads, one queue each (`convert_io.rs`).

use crate::convert_io::{Shared, Source, Target, worker};
use crate::probe::ImageFormat;
use crate::util::{open_ro, parse_size};
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Arguments of `quring convert`.
#[derive(Parser)]
pub struct Args {
    /// Source format (raw or qcow2; probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options (qcow2 output: create options).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file of the output: only what the source's top layer has is copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file (-B).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// The target exists: do not create it.
    #[arg(short = 'n')]
    no_create: bool,
    /// Sparse detection size: zero runs of this size (aligned) are not written (0: write
    /// everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse: String,
    /// Write compressed clusters (qcow2 output).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress (on stdout, as qemu-img).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Parallel requests (1 to 16, as qemu-img); the work runs on min(N, cores) queues.
    #[arg(short = 'm', default_value_t = 8)]
    parallel: usize,
    /// Out-of-order writes allowed.
    #[arg(short = 'W')]
    unordered: bool,
    /// Cache mode of the target (unsafe, the default, skips the final sync of a raw target).
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Cache mode of the source (accepted; the engine reads with O_DIRECT).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Copy the persistent bitmaps (qcow2 v3 source and target).
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Source image.
    src: PathBuf,
    /// Destination file.
    dst: PathBuf,
}

/// Largest -S (qemu-img's limit).
const MAX_SPARSE: u64 = 16 << 20;
/// Bytes per chunk (rounded up to the target's cluster size).
const CHUNK: u64 = 2 << 20;

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let out_fmt = ImageFormat::parse_output(&a.out_format)?;
    let sparse = parse_size(&a.sparse).ok().filter(|s| s % 512 == 0 && *s <= MAX_SPARSE).ok_or(
        "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. \
         Select 0 to disable sparse detection (fully allocates output).",
    )?;
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    if !(1..=16).contains(&a.parallel) {
        return Err("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16".into());
    }
    if a.compress && out_fmt == ImageFormat::Raw {
        return Err("Compression not supported for this file format".into());
    }
    if a.backing.is_some() && out_fmt == ImageFormat::Raw {
        return Err("Backing file not supported for file format 'raw'".into());
    }
    if a.backing.is_some() && a.backing_format.is_none() && !a.no_create {
        return Err("Use of backing file requires explicit backing format".into());
    }
    if !matches!(a.cache.as_str(), "unsafe" | "writeback" | "none" | "writethrough" | "directsync") {
        return Err(format!("Invalid cache option: {}", a.cache).into());
    }
    // The source, opened read-only (no probing warning: it is not written).
    let src_fmt = crate::probe::resolve(&a.src, a.format.as_deref(), false)?;
    let could_not = |e: String| format!("Could not open '{}': {e}", a.src.display());
    let src = match src_fmt {
        ImageFormat::Qcow2 => Source::Qcow2(open_ro(&a.src, a.force_share).map_err(|e| could_not(e.to_string()))?),
        ImageFormat::Raw => {
            let file = std::fs::File::open(&a.src).map_err(|e| could_not(crate::probe::os_text(&e)))?;
            let lock = quring::io::lock::ImageLock::acquire(
                &file,
                &a.src,
                quring::io::lock::LockMode::ReadOnly,
                a.force_share,
            )
            .map_err(|e| could_not(e.to_string()))?;
            // QEMU's raw size is in whole sectors (the tail reads as zeros).
            let size = file.metadata().map_err(|e| could_not(e.to_string()))?.len().div_ceil(512) * 512;
            Source::Raw { file, size, _lock: lock }
        }
    };
    if a.bitmaps {
        crate::convert_bitmaps::check_source(&src, a.skip_broken_bitmaps)?;
    }
    let size = src.size();
    let chain = match &src {
        Source::Qcow2(img) => crate::output::chain_files(img),
        Source::Raw { file, .. } => {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata()?;
            vec![crate::output::ChainFile { dev: m.dev(), ino: m.ino(), path: a.src.clone() }]
        }
    };
    let refuse = |e: String| format!("{}: error while converting {}: {e}", a.dst.display(), a.out_format);
    let top_only = a.backing.is_some();
    let (dst, zero_init) = if a.no_create {
        open_existing(&a, out_fmt, size, &chain)?
    } else {
        create_target(&a, out_fmt, size, &chain).map_err(refuse)?
    };
    if a.bitmaps {
        crate::convert_bitmaps::check_target(&dst, &a.out_format)?;
    }
    let cluster = match &dst {
        Target::Qcow2(img) => img.geometry().cluster_size(),
        Target::Raw { .. } => 512,
    };
    if a.compress
        && let Target::Qcow2(img) = &dst
        && img.l2_less()
    {
        return Err("Compression not supported for this file format (an L2-less image)".into());
    }
    let gran = if sparse == 0 || a.compress { 0 } else { sparse.max(cluster) };
    let threads = a.parallel.min(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let sh = Shared {
        src: &src,
        dst: &dst,
        size,
        chunk: CHUNK.div_ceil(cluster) * cluster,
        gran,
        zero_init,
        top_only,
        compress: a.compress,
        cluster,
        unordered: a.unordered,
        depth: a.parallel.div_ceil(threads).max(2),
        next: AtomicU64::new(0),
        turn: Mutex::new(0),
        turn_cv: Condvar::new(),
        done: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    };
    let progress = a.progress && !a.quiet;
    let result: Result<(), String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| worker(&sh))).collect();
        if progress {
            let mut p = crate::progress::Progress::start();
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(50));
                p.update(sh.done.load(Ordering::Relaxed), size);
            }
            p.finish();
        }
        let mut r = Ok(());
        for h in handles {
            let w = h.join().unwrap_or_else(|_| Err("a conversion thread panicked".into()));
            if r.is_ok() {
                r = w;
            }
        }
        r
    });
    result?;
    if a.bitmaps {
        crate::convert_bitmaps::copy(&src, &dst)?;
    }
    match dst {
        Target::Raw { file, _lock } => {
            if a.cache != "unsafe" {
                file.sync_all()?;
            }
        }
        Target::Qcow2(img) => img.close()?,
    }
    Ok(0)
}

/// Creates the target (`-n` absent). Returns it and whether it reads as zeros.
fn create_target(
    a: &Args,
    fmt: ImageFormat,
    size: u64,
    chain: &[crate::output::ChainFile],
) -> Result<(Target, bool), String> {
    match fmt {
        ImageFormat::Raw => {
            if let Some((k, _)) = crate::util::parse_opts(&a.options)?.first() {
                return Err(format!("Invalid parameter '{k}'"));
            }
            let (f, lock) = crate::output::open_output(&a.dst, chain, a.force_share)?;
            f.set_len(0).map_err(|e| format!("Could not truncate: {e}"))?;
            f.set_len(size).map_err(|e| format!("Could not resize: {e}"))?;
            Ok((Target::Raw { file: f, _lock: lock }, true))
        }
        ImageFormat::Qcow2 => {
            // The output is a new image: a new GUID (quring's identity extension, unless
            // `-o identity=off`), and with -B its backing file's GUID and length.
            let mut o = quring::format::layout::CreateOptions {
                identity: Some(quring::format::identity::Identity::generate()),
                ..Default::default()
            };
            crate::util::apply_create_opts(&mut o, &a.options).map_err(|e| e.to_string())?;
            if let Some(b) = &a.backing {
                o.backing_file = Some(b.clone());
                o.backing_fmt = a.backing_format.clone();
            }
            o.size = size;
            if let (Some(id), Some(b)) = (o.identity.as_mut(), o.backing_file.as_ref()) {
                let (guid, len) = crate::util::backing_identity(&a.dst, b, o.backing_fmt.as_deref());
                id.set_backing(guid, len.unwrap_or(size.div_ceil(512) * 512), b);
            }
            crate::output::check_replace(&a.dst, chain, a.force_share)?;
            // create takes the write lock before it truncates.
            quring::image::create(&a.dst, &o, true).map_err(|e| e.to_string())?;
            let img = open_target(&a.dst).map_err(|e| e.to_string())?;
            let zero_init = img.backing().is_none();
            Ok((Target::Qcow2(img), zero_init))
        }
    }
}

fn open_target(path: &std::path::Path) -> quring::Result<std::sync::Arc<quring::image::Image>> {
    let opts = quring::image::Options { hook: quring::io::hook::from_env(), ..Default::default() };
    quring::image::Image::open(path, &opts)
}

/// Opens the existing target (`-n`): it is not known to read as zeros.
fn open_existing(
    a: &Args,
    fmt: ImageFormat,
    size: u64,
    chain: &[crate::output::ChainFile],
) -> Result<(Target, bool), String> {
    let p = a.dst.display();
    if !a.dst.exists() {
        return Err(format!("Could not open '{p}': Could not open '{p}': No such file or directory"));
    }
    let t = match fmt {
        ImageFormat::Raw => {
            let (file, lock) = crate::output::open_output(&a.dst, chain, a.force_share)?;
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            if len < size {
                return Err("output file is smaller than input file".into());
            }
            Target::Raw { file, _lock: lock }
        }
        ImageFormat::Qcow2 => {
            crate::output::check_replace(&a.dst, chain, a.force_share)?;
            let img = open_target(&a.dst).map_err(|e| format!("Could not open '{p}': {e}"))?;
            if img.size() < size {
                return Err("output file is smaller than input file".into());
            }
            Target::Qcow2(img)
        }
    };
    Ok((t, false))
}
